//! Closes whose outcome filterd never told: rksmbd forgets such an open
//! and hands its handle to [`libfilter::settle::Unsettled`], which a
//! `close-settler` thread closes again until filterd answers for it (see
//! that module for why). Until then the client's retried CLOSE of it is
//! answered STATUS_FILE_NOT_AVAILABLE ([`Settling`]), and so are a
//! TREE_DISCONNECT of its tree and a LOGOFF of its session
//! ([`still_settling`]) and, from any connection, a reconnect of it
//! ([`SettlingFileIds`]).

use std::sync::Arc;

pub use libfilter::settle::{may_hold, Unsettled};

use libfilter::model::ResumeKey;

use crate::files::{Kind, Open};
use crate::server::Shared;
use crate::wire::status;

/// An open whose CLOSE filterd never answered, as its FileId named it:
/// kept by its connection ([`crate::server::Connection::settling`]).
#[derive(Clone, Copy, Debug)]
pub struct Settling {
    session: u64,
    /// The tree it was opened on.
    pub tree: u32,
    persistent_id: u64,
    /// Whether it is durable (or persistent): one a reconnect may name.
    durable: bool,
    /// Its handle, settling.
    pub key: ResumeKey,
}

impl Settling {
    /// The note of file open `o` (a directory has no handle to settle).
    pub fn of(o: &Open) -> Option<Settling> {
        match &o.kind {
            Kind::File { key, .. } => Some(Settling {
                session: o.session,
                tree: o.tree,
                persistent_id: o.persistent_id,
                durable: o.durable,
                key: *key,
            }),
            Kind::Dir { .. } => None,
        }
    }

    /// Whether it is an open of `session`.
    pub fn of_session(&self, session: u64) -> bool {
        self.session == session
    }

    /// Whether a request of `session` and `tree` naming persistent id
    /// `persistent` (none: a related request's) names this open.
    pub fn named_by(&self, session: u64, tree: u32, persistent: Option<u64>) -> bool {
        self.session == session
            && self.tree == tree
            && persistent.is_none_or(|p| p == self.persistent_id)
    }
}

/// Whether a close of an open of `session` (of its `tree` only, if
/// given) among `notes` still settles: its TREE_DISCONNECT (or LOGOFF) is
/// then STATUS_FILE_NOT_AVAILABLE, the tree (the session) staying, as the
/// retried CLOSE is — ending it would leave the client no way to name the
/// open, so it would forget an open whose close is not made.
pub fn still_settling<'a>(
    sh: &Shared,
    mut notes: impl Iterator<Item = &'a Settling>,
    session: u64,
    tree: Option<u32>,
) -> Result<(), u32> {
    if notes.any(|n| {
        n.session == session && tree.is_none_or(|t| t == n.tree) && sh.unsettled.contains(n.key)
    }) {
        Err(status::FILE_NOT_AVAILABLE)
    } else {
        Ok(())
    }
}

/// The persistent FileIds of the opens whose close settles, with their
/// handles, across connections: a DH2C or DHnC naming one is answered
/// STATUS_FILE_NOT_AVAILABLE while it settles ([`SettlingFileIds::settles`]).
/// The client's connection may be gone by then, and its notes
/// ([`crate::server::Connection::settling`]) with it; filterd, which
/// holds the handle attached to rksmbd, refuses the resume
/// (`NoSuchHandle`), which was STATUS_OBJECT_NAME_NOT_FOUND: the client
/// forgot an open whose close was not made, as a retried CLOSE answered
/// STATUS_FILE_CLOSED had it forget one (rvchaos 1). Bounded by the
/// handles settling: those settled go whenever one is noted.
///
/// Each FileId is kept with its open's client (user and client GUID): a
/// reconnect from another client is answered what it was before — the
/// FileId is a number anyone may send, and telling another user "retry"
/// would both say the open exists and hide the refusal it is owed
/// (re-review rr41b C).
#[derive(Default)]
pub struct SettlingFileIds(
    std::sync::Mutex<std::collections::HashMap<u64, (ResumeKey, OpenClient)>>,
);

/// Whose an open is, as a reconnect names it: the user its session logged
/// on as and, for a leased open only, its connection's client GUID — as
/// filterd's owner of it (`client_of` in [`crate::create`]): a reconnect
/// resumes any other open for any client GUID of its user, and so is told
/// to retry while it settles (re-review rr41h F3: smbprotocol picks a new
/// GUID per connection, and its DH2C was STATUS_OBJECT_NAME_NOT_FOUND).
/// As a reconnect asks, the GUID is the asking connection's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenClient {
    pub user: String,
    pub client_guid: Option<uuid::Uuid>,
}

impl OpenClient {
    /// Whether a reconnect by `asker` names an open of this client.
    fn owns(&self, asker: &OpenClient) -> bool {
        self.user == asker.user
            && self
                .client_guid
                .is_none_or(|g| asker.client_guid == Some(g))
    }
}

impl SettlingFileIds {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, (ResumeKey, OpenClient)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `n`'s close settles (its handle is in `unsettled`); the open is
    /// `client`'s. Only a durable open's is kept: another's persistent
    /// FileId is its volatile one, which no reconnect names.
    pub fn note(&self, unsettled: &Unsettled, n: &Settling, client: OpenClient) {
        if !n.durable {
            return;
        }
        let mut ids = self.lock();
        ids.retain(|_, (k, _)| unsettled.contains(*k));
        ids.insert(n.persistent_id, (n.key, client));
    }

    /// Whether the open of persistent FileId `persistent`, if it is
    /// `client`'s, still settles.
    pub fn settles(&self, unsettled: &Unsettled, persistent: u64, client: &OpenClient) -> bool {
        let mut ids = self.lock();
        match ids.get(&persistent) {
            Some((k, c)) if unsettled.contains(*k) => c.owns(client),
            Some(_) => {
                ids.remove(&persistent);
                false
            }
            None => false,
        }
    }
}

/// What a retried CLOSE of `n` is answered: STATUS_FILE_NOT_AVAILABLE
/// (retry) while its handle settles, else `Ok` — the close is made.
pub fn retried_close(sh: &Shared, n: &Settling) -> Result<(), u32> {
    if sh.unsettled.contains(n.key) {
        Err(status::FILE_NOT_AVAILABLE)
    } else {
        Ok(())
    }
}

/// The settling thread: runs for the life of rksmbd.
pub fn run(sh: Arc<Shared>) {
    sh.unsettled.run(|key, told| {
        test_delay_before_a_try();
        sh.filter.close_told(key, told)
    });
}

/// Tests only (debug builds): `$RKSMBD_TEST_SETTLE_DELAY_MS` holds each
/// try of a settling close, so that a test can reach rksmbd while the
/// close settles with filterd serving
/// (`rksmbd_reconnect_waits_for_a_settling_close`).
fn test_delay_before_a_try() {
    static DELAY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    crate::create::test_delay(
        &DELAY,
        "RKSMBD_TEST_SETTLE_DELAY_MS",
        "a settling close is held before its try",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A settling FileId is "retry" to its own client only (user and
    /// client GUID): another is answered what it was before (re-review
    /// rr41b C).
    #[test]
    fn a_settling_file_id_is_retry_to_its_own_client_only() {
        let unsettled = Unsettled::default();
        let ids = SettlingFileIds::default();
        let key = ResumeKey(uuid::Uuid::new_v4());
        let n = Settling {
            session: 1,
            tree: 1,
            persistent_id: 7,
            durable: true,
            key,
        };
        let own = OpenClient {
            user: "alice".into(),
            client_guid: Some(uuid::Uuid::new_v4()),
        };
        unsettled.add(key);
        ids.note(&unsettled, &n, own.clone());
        assert!(ids.settles(&unsettled, 7, &own));
        let other_user = OpenClient {
            user: "bob".into(),
            ..own.clone()
        };
        assert!(!ids.settles(&unsettled, 7, &other_user));
        let other_client = OpenClient {
            client_guid: Some(uuid::Uuid::new_v4()),
            ..own.clone()
        };
        assert!(!ids.settles(&unsettled, 7, &other_client));
        assert!(!ids.settles(&unsettled, 8, &own));
        // An open without a lease is its user's, whatever the client
        // GUID (re-review rr41h F3).
        let by_user = OpenClient {
            client_guid: None,
            ..own.clone()
        };
        ids.note(&unsettled, &n, by_user);
        assert!(ids.settles(&unsettled, 7, &other_client));
        assert!(!ids.settles(&unsettled, 7, &other_user));
    }
}
