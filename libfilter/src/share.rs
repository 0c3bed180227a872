//! The share-mode algebra (Windows rules; spec/smb-like.md "Share modes").
//!
//! A new open conflicts with an existing one when it asks for a right the
//! existing open does not share, or the existing open holds a right the new
//! open does not share. What a conflict means depends on the existing open:
//! a live open refuses the new one (sharing violation), a disconnected
//! persistent open keeps the file (file not available, retry later), a
//! disconnected non-persistent durable open is purged so the new one proceeds,
//! and a lost handle (its file vanished across a restart) holds nothing.
//!
//! Pure functions, no I/O: the daemon gathers the holders of a file and acts
//! on the [`ShareDecision`].

use crate::model::Rights;

/// One side of a share check: what an open does and what it lets others do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareMode {
    /// Rights the open uses.
    pub access: Rights,
    /// Rights the open lets others use meanwhile.
    pub share: Rights,
}

impl ShareMode {
    /// How a local (non-protocol) process counts: it reads and shares all.
    pub const LOCAL_PROCESS: ShareMode = ShareMode {
        access: Rights::READ,
        share: Rights::ALL,
    };
}

/// Whether two opens of the same file may coexist. Symmetric.
pub fn conflicts(a: ShareMode, b: ShareMode) -> bool {
    !b.share.contains(a.access) || !a.share.contains(b.access)
}

/// What kind of existing open a new open is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderState {
    /// Attached to a live client (or a local process).
    Live,
    /// Disconnected and persistent: keeps the file until resumed or expired.
    DisconnectedPersistent,
    /// Disconnected and durable but not persistent: purgeable.
    DisconnectedDurable,
    /// Its file could not be reopened after a restart: holds nothing.
    Lost,
}

/// An existing open of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder<K> {
    /// Its identity (a resume key in the daemon).
    pub key: K,
    /// Its share mode.
    pub mode: ShareMode,
    /// What kind of holder it is.
    pub state: HolderState,
}

/// The outcome of checking a new open against every existing open of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareDecision<K> {
    /// The open may proceed once these disconnected durable opens are purged
    /// (closed for good). Usually empty.
    Grant {
        /// Disconnected durable holders that conflict and must be closed first.
        purge: Vec<K>,
    },
    /// A live open conflicts: sharing violation.
    Violation,
    /// Only disconnected persistent opens conflict: retry later.
    NotAvailable,
}

/// Checks `new` against every holder. A live conflict wins over a persistent
/// one; nothing is purged unless the open is granted.
pub fn decide<K: Copy>(
    new: ShareMode,
    holders: impl IntoIterator<Item = Holder<K>>,
) -> ShareDecision<K> {
    let mut purge = Vec::new();
    let mut not_available = false;
    for h in holders {
        if h.state == HolderState::Lost || !conflicts(new, h.mode) {
            continue;
        }
        match h.state {
            HolderState::Live => return ShareDecision::Violation,
            HolderState::DisconnectedPersistent => not_available = true,
            HolderState::DisconnectedDurable => purge.push(h.key),
            HolderState::Lost => {}
        }
    }
    if not_available {
        ShareDecision::NotAvailable
    } else {
        ShareDecision::Grant { purge }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rights() -> impl Strategy<Value = Rights> {
        (0u8..8).prop_map(Rights::from_bits_truncate)
    }
    fn mode() -> impl Strategy<Value = ShareMode> {
        (rights(), rights()).prop_map(|(access, share)| ShareMode { access, share })
    }
    fn state() -> impl Strategy<Value = HolderState> {
        prop_oneof![
            Just(HolderState::Live),
            Just(HolderState::DisconnectedPersistent),
            Just(HolderState::DisconnectedDurable),
            Just(HolderState::Lost),
        ]
    }
    fn holders() -> impl Strategy<Value = Vec<Holder<usize>>> {
        prop::collection::vec((mode(), state()), 0..8).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(key, (mode, state))| Holder { key, mode, state })
                .collect()
        })
    }

    const R: Rights = Rights::READ;
    const W: Rights = Rights::WRITE;
    const D: Rights = Rights::DELETE;

    #[test]
    fn windows_examples() {
        let m = |a: Rights, s: Rights| ShareMode {
            access: a,
            share: s,
        };
        // Two readers sharing read coexist.
        assert!(!conflicts(m(R, R), m(R, R)));
        // A writer against a reader that shares only read.
        assert!(conflicts(m(W, Rights::ALL), m(R, R)));
        // A reader against a writer that does not share read... of the reader? No:
        // the reader must share write for the writer to stay.
        assert!(conflicts(m(R, R), m(W, Rights::ALL)));
        assert!(!conflicts(m(R, R.union(W)), m(W, Rights::ALL)));
        // Share none keeps everyone out.
        assert!(conflicts(m(R, Rights::NONE), m(R, Rights::ALL)));
        // Delete needs delete share.
        assert!(conflicts(m(D, Rights::ALL), m(R, R.union(W))));
        // A local process reads and shares all.
        assert!(!conflicts(ShareMode::LOCAL_PROCESS, m(W, R)));
        assert!(conflicts(ShareMode::LOCAL_PROCESS, m(W, W)));
    }

    #[test]
    fn disconnected_kinds() {
        let none = ShareMode {
            access: R.union(W),
            share: Rights::NONE,
        };
        let new = ShareMode {
            access: R,
            share: Rights::ALL,
        };
        let h = |key, state| Holder {
            key,
            mode: none,
            state,
        };
        assert_eq!(
            decide(new, [h(1, HolderState::DisconnectedDurable)]),
            ShareDecision::Grant { purge: vec![1] }
        );
        assert_eq!(
            decide(
                new,
                [
                    h(1, HolderState::DisconnectedDurable),
                    h(2, HolderState::DisconnectedPersistent)
                ]
            ),
            ShareDecision::NotAvailable
        );
        assert_eq!(
            decide(
                new,
                [
                    h(2, HolderState::DisconnectedPersistent),
                    h(3, HolderState::Live)
                ]
            ),
            ShareDecision::Violation
        );
        assert_eq!(
            decide(new, [h(4, HolderState::Lost)]),
            ShareDecision::Grant { purge: vec![] }
        );
    }

    proptest! {
        #[test]
        fn conflict_is_symmetric(a in mode(), b in mode()) {
            prop_assert_eq!(conflicts(a, b), conflicts(b, a));
        }

        #[test]
        fn share_all_opens_never_conflict(a in rights(), b in rights()) {
            let x = ShareMode { access: a, share: Rights::ALL };
            let y = ShareMode { access: b, share: Rights::ALL };
            prop_assert!(!conflicts(x, y));
        }

        #[test]
        fn conflict_needs_a_right_in_use(a in mode(), s in rights()) {
            // An open that uses no right conflicts with nothing that shares all.
            let idle = ShareMode { access: Rights::NONE, share: s };
            let open = ShareMode { access: a.access, share: Rights::ALL };
            prop_assert_eq!(conflicts(idle, open), !s.contains(a.access));
        }

        #[test]
        fn order_does_not_matter(new in mode(), mut hs in holders()) {
            let d1 = decide(new, hs.clone());
            hs.reverse();
            let d2 = decide(new, hs);
            match (d1, d2) {
                (ShareDecision::Grant { purge: mut p1 }, ShareDecision::Grant { purge: mut p2 }) => {
                    p1.sort_unstable();
                    p2.sort_unstable();
                    prop_assert_eq!(p1, p2);
                }
                (a, b) => prop_assert_eq!(a, b),
            }
        }

        #[test]
        fn grant_means_no_unpurged_conflict(new in mode(), hs in holders()) {
            if let ShareDecision::Grant { purge } = decide(new, hs.clone()) {
                for h in &hs {
                    if h.state != HolderState::Lost && conflicts(new, h.mode) {
                        prop_assert!(purge.contains(&h.key));
                        prop_assert_eq!(h.state, HolderState::DisconnectedDurable);
                    }
                }
                for k in &purge {
                    prop_assert!(hs.iter().any(|h| h.key == *k && conflicts(new, h.mode)));
                }
            }
        }

        #[test]
        fn refusals_have_a_reason(new in mode(), hs in holders()) {
            match decide(new, hs.clone()) {
                ShareDecision::Violation => prop_assert!(hs.iter().any(|h|
                    h.state == HolderState::Live && conflicts(new, h.mode))),
                ShareDecision::NotAvailable => {
                    prop_assert!(hs.iter().any(|h|
                        h.state == HolderState::DisconnectedPersistent && conflicts(new, h.mode)));
                    prop_assert!(!hs.iter().any(|h|
                        h.state == HolderState::Live && conflicts(new, h.mode)));
                }
                ShareDecision::Grant { .. } => {}
            }
        }

        #[test]
        fn more_holders_never_loosen(new in mode(), hs in holders(), extra in holders()) {
            let before = decide(new, hs.clone());
            let mut all = hs;
            all.extend(extra.into_iter().map(|mut h| { h.key += 100; h }));
            let after = decide(new, all);
            let rank = |d: &ShareDecision<usize>| match d {
                ShareDecision::Grant { .. } => 0,
                ShareDecision::NotAvailable => 1,
                ShareDecision::Violation => 2,
            };
            prop_assert!(rank(&after) >= rank(&before));
        }
    }
}
