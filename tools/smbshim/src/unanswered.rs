//! The create GUIDs of a session's durable CREATEs that filterd did not
//! answer in time ([`Unanswered`]), for its LOGOFF to close.
//!
//! smbshim answers a CREATE whose filterd call timed out (or whose filterd
//! connection was lost) STATUS_FILE_NOT_AVAILABLE, "retry": filterd may
//! still make the open, and libfilter then keeps it detached
//! (`FilterClient::open_replayed_by_guid`) so that the client's replay of
//! its create GUID finds it and runs nothing twice. Such an open is in no
//! session's table: a LOGOFF that closes the table's opens left it
//! disconnected for its durable timeout, refusing other clients and
//! counting against the client's caps. So each session remembers the
//! GUIDs of its durable CREATEs while their call is in flight, and keeps
//! those that got no answer; its LOGOFF closes each by GUID
//! (`server::close_unanswered`), and a late answer that comes after the
//! LOGOFF is closed, not detached (`libfilter::client::SessionEnd`).

use std::collections::VecDeque;

/// Most unanswered create GUIDs one session remembers; the oldest beyond
/// is forgotten with a warning (its open, if filterd made it, waits for
/// its durable timeout after a LOGOFF, as all did before).
pub const UNANSWERED_MAX: usize = 1024;

/// One session's create GUIDs of CREATEs in flight or unanswered, oldest
/// first, at most [`UNANSWERED_MAX`].
#[derive(Debug, Default)]
pub struct Unanswered {
    guids: VecDeque<uuid::Uuid>,
}

impl Unanswered {
    /// A CREATE with create GUID `guid` is being sent.
    pub fn note(&mut self, guid: uuid::Uuid) {
        self.guids.push_back(guid);
        while self.guids.len() > UNANSWERED_MAX {
            if let Some(old) = self.guids.pop_front() {
                eprintln!(
                    "smbshim: more than {UNANSWERED_MAX} unanswered durable CREATEs in one session; \
                     create GUID {old} is forgotten (a LOGOFF will not close its open)"
                );
            }
        }
    }

    /// A CREATE with `guid` was answered, or its open is held by a session
    /// (stored in smbshim's table): nothing is left for the LOGOFF.
    pub fn forget(&mut self, guid: uuid::Uuid) {
        if let Some(i) = self.guids.iter().position(|g| *g == guid) {
            self.guids.remove(i);
        }
    }

    /// The GUIDs, for the session's LOGOFF (none are left).
    pub fn take(&mut self) -> Vec<uuid::Uuid> {
        let mut v: Vec<uuid::Uuid> = self.guids.drain(..).collect();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_oldest_forgotten_and_answered_ones_leave() {
        let mut u = Unanswered::default();
        let g = |n: u128| uuid::Uuid::from_u128(n);
        for n in 0..(UNANSWERED_MAX as u128 + 3) {
            u.note(g(n));
        }
        u.forget(g(5));
        let left = u.take();
        assert_eq!(left.len(), UNANSWERED_MAX - 1);
        assert_eq!(left.first(), Some(&g(3)), "the three oldest were forgotten");
        assert!(!left.contains(&g(5)));
        assert!(u.take().is_empty());
    }
}
