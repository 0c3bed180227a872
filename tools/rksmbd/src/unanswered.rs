//! The DH2Q CREATEs of a session answered STATUS_SERVER_UNAVAILABLE
//! ([`Unanswered`]), for its LOGOFF, or an AppInstanceId's takeover, to
//! close what filterd may have made of them.
//!
//! A DH2Q CREATE whose filterd call gave up is answered
//! STATUS_SERVER_UNAVAILABLE (`create::failed_status`), and filterd's late
//! open, if it waits for a replay (persistent, or durable with H), is left
//! disconnected so that the client's replay of its create GUID takes it
//! (`FilterClient::open_replayed_by_guid`). A client that does not replay
//! (smbprotocol, Samba's libsmb, older Linux kernels) never learns of that
//! open, and no session tracks it (`sessions::Link::track`): it refused
//! the client's own retry and everyone else's until its durable timeout,
//! through the session's LOGOFF and an AppInstanceId takeover. So each
//! session remembers those create GUIDs until the client is told SUCCESS
//! for an open of one (`sessions::Registry::client_got`: a replay, a fresh
//! retry, a DH2C); its LOGOFF ends the session's
//! `SessionEnd` (a late answer that comes after is closed by libfilter),
//! is answered, and the rest are closed by GUID on the closer thread
//! ([`Closer`]). A lost connection does
//! not: that is when the client reconnects and replays.

use std::collections::VecDeque;
use std::sync::{mpsc, Arc, Weak};
use std::time::Duration;

use libfilter::closer::Tried;
use libfilter::model::{ClientId, CreateGuid, RelPath};
use libfilter::proto::ErrorCode;

use crate::server::Shared;
use crate::sessions::Registry;

/// Most create GUIDs one session remembers; the oldest beyond is
/// forgotten with a warning (its open, if filterd made it, waits for its
/// durable timeout, as every one did before).
pub const UNANSWERED_MAX: usize = 1024;

/// A DH2Q CREATE answered STATUS_SERVER_UNAVAILABLE: what names its open.
#[derive(Debug, Clone)]
pub struct Unanswered {
    /// The client's create GUID.
    pub guid: uuid::Uuid,
    /// The filterd client the open was asked for.
    pub client: ClientId,
    /// Its owner (the user).
    pub owner: Option<String>,
    /// Its AppInstanceId and file, if it carried one.
    pub app: Option<([u8; 16], RelPath)>,
}

/// One session's [`Unanswered`] CREATEs, oldest first, at most
/// [`UNANSWERED_MAX`].
#[derive(Debug, Default)]
pub struct Unanswereds(VecDeque<Unanswered>);

impl Unanswereds {
    /// `u` was answered STATUS_SERVER_UNAVAILABLE (again, for a replay).
    /// Returns the create GUIDs forgotten to stay within
    /// [`UNANSWERED_MAX`].
    pub fn note(&mut self, u: Unanswered) -> Vec<uuid::Uuid> {
        self.0.retain(|o| o.guid != u.guid);
        self.0.push_back(u);
        let mut dropped = Vec::new();
        while self.0.len() > UNANSWERED_MAX {
            if let Some(old) = self.0.pop_front() {
                tracing::warn!(
                    create_guid = %old.guid,
                    "more than {UNANSWERED_MAX} unanswered DH2Q CREATEs in one session; \
                     the oldest is forgotten (a LOGOFF will not close its open)"
                );
                dropped.push(old.guid);
            }
        }
        dropped
    }

    /// Filterd client `client` got an open of `guid`: a session holds it
    /// now. Returns whether `guid` is still listed (another client's,
    /// another open in filterd: another user's reuse of the GUID leaves
    /// this one to the LOGOFF).
    pub fn forget(&mut self, client: &ClientId, guid: uuid::Uuid) -> bool {
        self.0.retain(|u| u.guid != guid || u.client != *client);
        self.0.iter().any(|u| u.guid == guid)
    }

    /// Those of AppInstanceId `app` on `path` but another create GUID
    /// than `guid`'s (the client's own replay), taken out.
    pub fn take_app(&mut self, app: [u8; 16], path: &RelPath, guid: uuid::Uuid) -> Vec<Unanswered> {
        let (taken, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.0).into_iter().partition(|u| {
                u.guid != guid && u.app.as_ref().is_some_and(|(a, p)| *a == app && p == path)
            });
        self.0 = kept.into();
        taken
    }

    /// Whether one of AppInstanceId `app` is left.
    pub fn has_app(&self, app: [u8; 16]) -> bool {
        self.0
            .iter()
            .any(|u| u.app.as_ref().is_some_and(|(a, _)| *a == app))
    }

    /// All of them, for the session's LOGOFF (none are left).
    pub fn take(&mut self) -> Vec<Unanswered> {
        self.0.drain(..).collect()
    }
}

/// Connection number the closer claims create GUIDs as
/// (`Registry::claim_free`): no client connection's (those count up from
/// 0). A CREATE of the GUID that filterd answered while the closer holds
/// it (a replay, a fresh retry) waits for the closer to let go before it
/// claims, as for a connection letting its opens go
/// (`OpenHolder::LettingGo`): the closer's resume finds the CREATE's
/// handle attached and leaves it. It does not make a replay wait for
/// the close itself: a replay's ReplayOpen reaches filterd before its
/// claim.
pub const CLOSER_CONN: u64 = u64::MAX;

/// The `unanswered-closer` thread's queue. A LOGOFF answers first and
/// hands its unanswered CREATEs here: each close may wait a call timeout
/// while filterd is stalled, and its connection's other requests waited
/// behind them (five of them: five timeouts; re-review unavail3 2). One
/// that failed for a passing cause (filterd down or restarting) is tried
/// again once rksmbd has reattached (`libfilter::closer`); its create GUID
/// stays handed over (`Registry::to_close`) meanwhile. Dropped with the
/// server, it ends the thread.
pub struct Closer(Arc<libfilter::closer::Closer<Unanswered>>);

/// The closer thread's end of [`Closer`].
pub struct Closing(Arc<libfilter::closer::Closer<Unanswered>>);

impl Closer {
    /// A queue and the end the closer thread runs ([`Closing::run`]).
    pub fn new() -> (Closer, Closing) {
        let q = Arc::new(libfilter::closer::Closer::default());
        (Closer(q.clone()), Closing(q))
    }

    /// Closes `gone` (a LOGOFF's) after the caller's reply.
    pub fn push(&self, gone: Vec<Unanswered>) {
        self.0.push(gone, None);
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl Closing {
    /// Closes what is pushed until the server (`sh`) is gone.
    pub fn run(self, sh: &Weak<Shared>) {
        self.0.run(
            || sh.upgrade().map(|s| s.filter.clone()),
            |u, unanswered| {
                sh.upgrade()
                    .map_or(Tried::Done, |s| close(&s, u, unanswered))
            },
            |u| {
                if let Some(s) = sh.upgrade() {
                    s.registry.closing_claim(&u.client, u.guid);
                }
            },
        );
    }
}

/// An AppInstanceId takeover's: closes `gone` before the takeover's own
/// open, which the earlier open of the instance would refuse, but waits
/// for their first tries at most one call timeout in all, not one per
/// open (filterd stalled, its own open would wait as long); the closer
/// goes on after.
pub fn close_before_open(sh: &Shared, gone: Vec<Unanswered>) {
    if gone.is_empty() {
        return;
    }
    let (tx, rx) = mpsc::channel();
    sh.closer.0.push(gone, Some(tx));
    let _ = rx.recv_timeout(call_timeout());
}

/// libfilter's call timeout, read as libfilter reads it. Parsed here
/// before, "0" waited no time at all and " 1500" the two-minute default,
/// unlike the calls (re-review unavail4 3).
fn call_timeout() -> Duration {
    libfilter::client::call_timeout_from_env()
}

/// Closes the open filterd may have made for `u` (a CREATE of a session
/// that logged off, or of an app instance taken over), on the closer
/// thread. The create GUID is claimed (`Registry::claim_free`); while a
/// connection holds it, tried again unless the client got the open
/// ([`held_elsewhere`]: the holder may be another user's), then skipped
/// if the client got an open of it since it was handed over
/// (`Registry::closing_owns`, under the claim); else its handle is taken
/// by GUID, if disconnected, and closed. A handle still attached (a
/// replay's answer being read, or the late answer's undo to come) is
/// refused `NoSuchHandle`: its holder or undo decides (a late answer
/// after a LOGOFF closes it, `SessionEnd`). A resume that goes unanswered
/// is closed when its answer comes if that answer is an open
/// (`resume_by_guid_to_close`; a late refusal leaves the handle
/// disconnected), and tried again with backoff ([`Tried::Unanswered`]); a
/// try on the same connection that finds no disconnected handle (maybe the
/// one that resume attached, whose close may be lost with the connection)
/// waits for a reattach ([`Tried::Reattach`]) instead of ending.
/// One that failed for another passing cause (filterd down or restarting,
/// a failed commit, busy) is [`Tried::Again`]; both still handed over:
/// before, it was forgotten and the open waited for its durable timeout.
fn close(sh: &Shared, u: &Unanswered, unanswered: bool) -> Tried {
    if !sh.registry.claim_free(u.guid, CLOSER_CONN) {
        return held_elsewhere(&sh.registry, u);
    }
    let tried = if sh.registry.closing_owns(&u.client, u.guid) {
        test_delay_after_the_closer_claims();
        take_and_close(sh, u, unanswered)
    } else {
        Tried::Done
    };
    if tried == Tried::Done {
        sh.registry.closing_claim(&u.client, u.guid);
    }
    sh.registry.let_go(u.guid, CLOSER_CONN);
    tried
}

/// The closer found `u`'s create GUID held by a connection
/// (`Registry::claim_free` refused). Holds are keyed by GUID alone: the
/// holder may be another user's open reusing the GUID, which says nothing
/// of `u`'s open — ended as done then, the close of `u`'s was dropped.
/// Done only once `u`'s client got an open of it (its replay, a retry:
/// `Registry::client_got` took it out of the hand-over); else tried again
/// later, when the holder may have let go (bounded by the closer's
/// patience).
fn held_elsewhere(registry: &Registry, u: &Unanswered) -> Tried {
    if registry.closing_owns(&u.client, u.guid) {
        Tried::Again
    } else {
        registry.closing_claim(&u.client, u.guid);
        Tried::Done
    }
}

/// Takes `u`'s open by GUID and closes it; `unanswered`: an earlier try
/// went unanswered on this connection ([`libfilter::closer::no_such_handle`]).
fn take_and_close(sh: &Shared, u: &Unanswered, unanswered: bool) -> Tried {
    match sh
        .filter
        .resume_by_guid_to_close(u.client.clone(), CreateGuid(u.guid), u.owner.clone())
    {
        Ok(h) => {
            let key = h.info.key;
            drop(h);
            if let Err(e) = sh.filter.close(key) {
                tracing::warn!(resume_key = %key, error = %e, "closing an unanswered CREATE's open");
                if crate::settle::may_hold(&e) {
                    sh.unsettled.add(key);
                }
            }
            Tried::Done
        }
        Err(e) if e.code() == Some(ErrorCode::NoSuchHandle) => {
            libfilter::closer::no_such_handle(unanswered)
        }
        Err(e) if libfilter::closer::passing(&e) => {
            tracing::warn!(create_guid = %u.guid, error = %e,
                "taking an unanswered CREATE's open to close it: tried again once filterd serves");
            libfilter::closer::tried_again(&e)
        }
        Err(e) => {
            tracing::warn!(create_guid = %u.guid, error = %e, "taking an unanswered CREATE's open to close it");
            Tried::Done
        }
    }
}

/// Tests only (debug builds): `$RKSMBD_TEST_CLOSER_CLAIM_DELAY_MS`
/// holds the closer between its claim of a create GUID and its resume, so
/// that a CREATE of the GUID meets the claim
/// (`rksmbd_waits_for_the_closer_s_claim_before_a_fresh_create`).
fn test_delay_after_the_closer_claims() {
    static DELAY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    crate::create::test_delay(
        &DELAY,
        "RKSMBD_TEST_CLOSER_CLAIM_DELAY_MS",
        "the closer holds a create GUID before its resume",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(n: u128, app: Option<u8>) -> Unanswered {
        Unanswered {
            guid: uuid::Uuid::from_u128(n),
            client: ClientId::new("c".to_owned()).expect("client id"),
            owner: None,
            app: app.map(|a| ([a; 16], RelPath::new("f").expect("path"))),
        }
    }

    /// A GUID held by a connection (another user's open reusing it, or
    /// the client's own replay) ends the close only once the client got
    /// its open; another user's SUCCESS for it leaves it to try again.
    #[test]
    fn a_guid_held_elsewhere_is_tried_again_until_the_client_got_it() {
        let r = Registry::default();
        let alice = u(10, None);
        assert_eq!(r.to_close(|| vec![alice.clone()]).len(), 1);
        let bob = ClientId::new("smb-user:bob".to_owned()).expect("client id");
        r.client_got(&bob, alice.guid);
        assert_eq!(held_elsewhere(&r, &alice), Tried::Again, "bob's hold");
        assert!(r.closing_owns(&alice.client, alice.guid));
        r.client_got(&alice.client, alice.guid);
        assert_eq!(held_elsewhere(&r, &alice), Tried::Done, "alice's replay");
    }

    /// A takeover waits for its closes as long as libfilter's calls wait:
    /// "0" is the default, blanks around the number are ignored.
    #[test]
    fn a_takeover_waits_libfilter_s_call_timeout() {
        // The variable is not set here (tests run on threads that may read
        // the environment: never written while they run); what libfilter
        // makes of its values is libfilter's `call_timeout_of`.
        use libfilter::client::{call_timeout_of, DEFAULT_CALL_TIMEOUT};
        assert_eq!(call_timeout(), libfilter::client::call_timeout_from_env());
        assert_eq!(call_timeout_of(None), DEFAULT_CALL_TIMEOUT);
        assert_eq!(call_timeout_of(Some("0")), DEFAULT_CALL_TIMEOUT);
        assert_eq!(call_timeout_of(Some(" 1500")), Duration::from_millis(1500));
    }

    /// Bounded, the oldest forgotten; a replayed one leaves; a takeover
    /// takes its app's others only.
    #[test]
    fn bounded_replayed_ones_leave_and_a_takeover_takes_its_app_s() {
        let mut l = Unanswereds::default();
        for n in 0..(UNANSWERED_MAX as u128 + 2) {
            l.note(u(n, None));
        }
        let c = ClientId::new("c".to_owned()).expect("client id");
        assert!(!l.forget(&c, uuid::Uuid::from_u128(5)));
        l.note(u(9000, Some(1)));
        l.note(u(9001, Some(1)));
        let path = RelPath::new("f").expect("path");
        let taken = l.take_app([1; 16], &path, uuid::Uuid::from_u128(9001));
        assert_eq!(
            taken.iter().map(|u| u.guid.as_u128()).collect::<Vec<_>>(),
            [9000]
        );
        let left = l.take();
        assert_eq!(left.len(), UNANSWERED_MAX - 1);
        assert!(!left
            .iter()
            .any(|u| [0, 1, 2, 5].contains(&u.guid.as_u128())));
        assert!(l.take().is_empty());
    }
}
