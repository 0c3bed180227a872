//! Leases (spec/smb-like.md "Leases"; NFS-like delegations are the same
//! leases: a read delegation is R, a write delegation RW).
//!
//! A lease is held by a lease key (one client's opens of a file may share it)
//! and has a state made of R (read caching), H (handle caching) and W (write
//! caching), with an epoch that grows at every change.
//!
//! Grant: a key gets what it asks for, less W when any open of the file by
//! another key (or without a lease) exists — W caching needs the file to
//! itself. R and H are shared among keys. A delegation (a lease asked
//! through an NFS-like frontend, [`DELEGATION_PROTOCOL`]) gets nothing
//! while another client's open may write the file.
//!
//! Break (an open by another key, a local open, a rename or delete):
//!
//! | trigger | what is removed |
//! |---|---|
//! | the new open only reads | W |
//! | the new open writes | R and W |
//! | the new open would otherwise fail with a sharing violation, or the file is renamed or deleted | H (as well) |
//!
//! So RWH broken by a reader becomes RH, by a writer H; RH broken by a
//! conflicting reader becomes R. Breaking from a state with W or H needs the
//! holder's acknowledgement (it may have cached writes or handles to flush);
//! R alone is lowered without one. Pure: the daemon applies it.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// A set of caching rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LeaseState(u8);

impl LeaseState {
    /// Read caching.
    pub const R: LeaseState = LeaseState(1);
    /// Handle caching.
    pub const H: LeaseState = LeaseState(2);
    /// Write caching.
    pub const W: LeaseState = LeaseState(4);
    /// Nothing.
    pub const NONE: LeaseState = LeaseState(0);

    /// Union.
    pub const fn with(self, o: LeaseState) -> LeaseState {
        LeaseState(self.0 | o.0)
    }
    /// Difference.
    pub const fn without(self, o: LeaseState) -> LeaseState {
        LeaseState(self.0 & !o.0)
    }
    /// Intersection.
    pub const fn and(self, o: LeaseState) -> LeaseState {
        LeaseState(self.0 & o.0)
    }
    /// Whether every right of `o` is in `self`.
    pub const fn contains(self, o: LeaseState) -> bool {
        self.0 & o.0 == o.0
    }
    /// Whether it holds nothing.
    pub const fn is_none(self) -> bool {
        self.0 == 0
    }
    /// The raw bits (R = 1, H = 2, W = 4): the stored records' form.
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// The state of `bits`, if they name one [`LeaseState::parse`] would
    /// accept (no unknown bit; no W caching without R).
    pub fn from_bits(bits: u8) -> Option<LeaseState> {
        let st = LeaseState(bits);
        let known = bits & !7 == 0;
        let w_without_r = st.contains(LeaseState::W) && !st.contains(LeaseState::R);
        (known && !w_without_r).then_some(st)
    }
    /// Parses "", "R", "RH", "RW", "RWH" (and "H", what a writer leaves of RH).
    pub fn parse(s: &str) -> Option<LeaseState> {
        let mut st = LeaseState::NONE;
        for c in s.chars() {
            let bit = match c {
                'R' => LeaseState::R,
                'H' => LeaseState::H,
                'W' => LeaseState::W,
                _ => return None,
            };
            if st.contains(bit) {
                return None;
            }
            st = st.with(bit);
        }
        // W caching without read caching is meaningless.
        if st.contains(LeaseState::W) && !st.contains(LeaseState::R) {
            return None;
        }
        Some(st)
    }
}

impl fmt::Display for LeaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (bit, c) in [
            (LeaseState::R, 'R'),
            (LeaseState::W, 'W'),
            (LeaseState::H, 'H'),
        ] {
            if self.contains(bit) {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for LeaseState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for LeaseState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        LeaseState::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid lease state {s:?}")))
    }
}

/// A client-chosen lease key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseKey(pub Uuid);

impl fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// What triggers a break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakTrigger {
    /// The new open writes.
    pub writes: bool,
    /// The new open conflicts with the holder's share mode (or the file is
    /// to be renamed or deleted): handle caching must go.
    pub handle_conflict: bool,
}

/// The state a held lease must break to, or `None` when it may stay.
pub fn break_to(held: LeaseState, t: BreakTrigger) -> Option<LeaseState> {
    let mut to = if t.writes {
        held.without(LeaseState::R).without(LeaseState::W)
    } else {
        held.without(LeaseState::W)
    };
    if t.handle_conflict {
        to = to.without(LeaseState::H);
    }
    (to != held).then_some(to)
}

/// The protocol name of frontends whose leases follow Windows' rules
/// (MS-FSA 2.1.5.1.2.2, as Windows and Samba apply them to SMB 2/3
/// leases) rather than the table above: rksmbd's.
pub const MSFSA_PROTOCOL: &str = "smb2";

/// The protocol name of frontends whose leases are NFS-like delegations
/// (spec/nfs-like.md "Delegations", RFC 8881 §10.4): nfsshim's. A
/// delegation is granted only while no other client may write the file
/// ([`grantable_delegation`]).
pub const DELEGATION_PROTOCOL: &str = "nfs";

/// What a delegation request is granted, [`grantable`] having given
/// `granted`: nothing while another client's open (or a local process)
/// may write the file (`others_write`). Such a writer's WRITEs recall no
/// read delegation — writes through an SMB-style open do not break read
/// caching by Windows' rules, nor does a local write — so the holder
/// would serve stale cached data; RFC 8881 §10.4 grants a delegation only
/// where no conflicting open exists.
pub fn grantable_delegation(granted: LeaseState, others_write: bool) -> LeaseState {
    if others_write {
        LeaseState::NONE
    } else {
        granted
    }
}

/// The first bytes of the lease keys an SMB 2/3 frontend makes for the
/// oplocks it models as leases (level II R, exclusive RW, batch RWH):
/// MS-FSA breaks and grants oplocks by other rules than leases, so the
/// filter must tell them apart. A client's own lease keys are GUIDs it
/// chose; one starting with these eight bytes is taken for an oplock.
pub const OPLOCK_KEY_TAG: &[u8; 8] = b"rksmbdop";

/// Whether `k` is a key an SMB 2/3 frontend made for an oplock
/// ([`OPLOCK_KEY_TAG`]).
pub fn is_oplock_key(k: &LeaseKey) -> bool {
    k.0.as_bytes().starts_with(OPLOCK_KEY_TAG)
}

/// MS-FSA 2.1.5.1.2.2: the state a held SMB 2/3 lease of another key must
/// break to when the file is opened. When the open would fail with a
/// sharing violation, only H caching goes (the holder may close its
/// cached handles; the open is then checked again, and breaks W only if
/// it gets past the sharing check); otherwise W caching goes (the new
/// open may read what the holder cached). An overwrite or supersede takes
/// everything (no H-only state exists to break to). An open never takes
/// read caching away otherwise — a write does.
///
/// An oplock (`oplock`: the holder's key is an [`is_oplock_key`]) has no
/// H-only or RW-without-H step: an exclusive or batch oplock breaks to
/// level II (R) on any open, sharing violation or not (MS-FSA 2.1.4.12,
/// "BreakToTwo"), and to none on an overwrite or supersede.
pub fn break_to_on_open(
    held: LeaseState,
    handle_conflict: bool,
    truncates: bool,
    oplock: bool,
) -> Option<LeaseState> {
    let mut to = if oplock {
        held.and(LeaseState::R)
    } else if handle_conflict {
        held.without(LeaseState::H)
    } else {
        held.without(LeaseState::W)
    };
    if truncates {
        to = LeaseState::NONE;
    }
    (to != held).then_some(to)
}

/// Whether an open that breaks an SMB 2/3 lease from `held` to `to` must
/// wait for the holder's acknowledgement: only when the break takes write
/// caching (the holder may have to flush), or handle caching while the
/// open conflicts with the holder's share mode (the holder may close its
/// cached handles). Taking read or handle caching otherwise is announced
/// and the open goes on (MS-FSA 2.1.5.1.2.2 as Windows and Samba apply it:
/// smbtorture smb2.lease.breaking4, an overwrite beside an RH lease).
pub fn open_waits_for(held: LeaseState, to: LeaseState, handle_conflict: bool) -> bool {
    let takes = |s: LeaseState| held.contains(s) && !to.contains(s);
    takes(LeaseState::W) || (handle_conflict && takes(LeaseState::H))
}

/// After the holder of an SMB 2/3 lease acknowledged a break to `acked`,
/// the next break when the opens that met the lease mid-break need it down
/// to `required`: `None` when `acked` is low enough. A lease that still
/// caches writes or handles is broken a step at a time, keeping read
/// caching first (RH to R, then R to none; MS-SMB2 3.3.4.7 as Windows
/// does it: smbtorture smb2.lease.breaking3).
pub fn next_break_step(acked: LeaseState, required: LeaseState) -> Option<LeaseState> {
    let required = required.and(acked);
    if required == acked {
        return None;
    }
    let next = if acked.contains(LeaseState::W) || acked.contains(LeaseState::H) {
        required.with(LeaseState::R).and(acked)
    } else {
        required
    };
    Some(if next == acked { required } else { next })
}

/// MS-FSA 2.1.4.12 for a WRITE or a byte-range LOCK through another key's
/// open: read caching of SMB 2/3 leases that do not also cache writes
/// (R, RH) and level II oplocks go to none. (A lease with W cannot be
/// held beside another key's open.) RH needs an acknowledgement
/// ([`ack_required`]), R does not; the write or lock does not wait.
pub fn break_for_write(held: LeaseState) -> Option<LeaseState> {
    (held.contains(LeaseState::R) && !held.contains(LeaseState::W)).then_some(LeaseState::NONE)
}

/// What an SMB 2/3 key asking for `requested` is granted beside other
/// keys' leases and oplocks ([`grantable`] first): an oplock is refused
/// (none) beside a lease that caches handles, and a lease gets no H
/// caching beside an oplock that still holds anything (MS-FSA 2.1.5.17,
/// as Windows and Samba grant them: smbtorture smb2.lease.oplock). An
/// oplock that cannot cache writes is level II: R alone (it is broken
/// without an acknowledgement).
/// `others`: the states and oplock-ness of the other keys on the file.
pub fn grantable_beside(
    requested: LeaseState,
    oplock: bool,
    others: impl IntoIterator<Item = (LeaseState, bool)>,
) -> LeaseState {
    let mut g = requested;
    for (st, other_oplock) in others {
        if oplock && !other_oplock && st.contains(LeaseState::H) {
            return LeaseState::NONE;
        }
        if !oplock && other_oplock && !st.is_none() {
            g = g.without(LeaseState::H);
        }
    }
    if oplock && !g.contains(LeaseState::W) {
        g = g.and(LeaseState::R);
    }
    g
}

/// The state a held lease must break to when its file is renamed or
/// deleted: handle caching goes, read and write caching stay.
pub fn break_for_namespace(held: LeaseState) -> Option<LeaseState> {
    held.contains(LeaseState::H)
        .then(|| held.without(LeaseState::H))
}

/// Whether lowering `from` needs the holder's acknowledgement.
pub fn ack_required(from: LeaseState) -> bool {
    from.contains(LeaseState::W) || from.contains(LeaseState::H)
}

/// What a key asking for `requested` gets, given whether any open of the
/// file by another key (or without a lease) exists.
pub fn grantable(requested: LeaseState, others_open: bool) -> LeaseState {
    if others_open {
        requested.without(LeaseState::W)
    } else {
        requested
    }
}

/// What an open that breaks nothing (an attribute-only "stat" open) may be
/// granted beside other keys' leases as they are: `requested`, unless
/// another key caches writes (W), which only a break could share — then
/// nothing. A stat open skips the oplock break check (MS-FSA 2.1.5.1.2.2),
/// so its oplock request meets the other key's exclusive oplock and is not
/// granted (MS-FSA 2.1.5.17.2, `STATUS_OPLOCK_NOT_GRANTED`); the server
/// answers lease state none (MS-SMB2 3.3.5.9.8). Beside R or RH leases it
/// is granted as any open is (smbtorture smb2.lease.statopen: alone, RWH).
pub fn grantable_without_break(
    requested: LeaseState,
    others: impl IntoIterator<Item = LeaseState>,
) -> LeaseState {
    if others.into_iter().any(|s| s.contains(LeaseState::W)) {
        LeaseState::NONE
    } else {
        requested
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn st(s: &str) -> LeaseState {
        LeaseState::parse(s).unwrap()
    }

    #[test]
    fn breaking3_chain() {
        // RWH acknowledged as RH while an overwrite waits: RH, R, none.
        assert_eq!(next_break_step(st("RH"), st("")), Some(st("R")));
        assert_eq!(next_break_step(st("R"), st("")), Some(st("")));
        assert_eq!(next_break_step(st("RH"), st("RH")), None);
        assert_eq!(next_break_step(st("RH"), st("R")), Some(st("R")));
        // breaking4: an overwrite beside RH without a sharing conflict.
        assert!(!open_waits_for(st("RH"), st(""), false));
        assert!(open_waits_for(st("RH"), st("R"), true));
        assert!(open_waits_for(st("RWH"), st("RH"), false));
    }

    #[test]
    fn a_stat_open_gets_nothing_beside_another_keys_write_caching() {
        assert_eq!(grantable_without_break(st("RWH"), []), st("RWH"));
        assert_eq!(
            grantable_without_break(st("RH"), [st("RH"), st("R")]),
            st("RH")
        );
        assert_eq!(grantable_without_break(st("RH"), [st("RWH")]), st(""));
        assert_eq!(
            grantable_without_break(st("R"), [st("R"), st("RW")]),
            st("")
        );
    }

    #[test]
    fn parse_and_print() {
        for s in ["", "R", "RH", "RW", "RWH", "H"] {
            assert_eq!(st(s).to_string(), s);
        }
        for bad in ["W", "WH", "RR", "X", "r"] {
            assert!(LeaseState::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn break_table() {
        let rd = BreakTrigger {
            writes: false,
            handle_conflict: false,
        };
        let wr = BreakTrigger {
            writes: true,
            handle_conflict: false,
        };
        let rd_h = BreakTrigger {
            writes: false,
            handle_conflict: true,
        };
        let wr_h = BreakTrigger {
            writes: true,
            handle_conflict: true,
        };
        assert_eq!(break_to(st("RWH"), rd), Some(st("RH")));
        assert_eq!(break_to(st("RWH"), wr), Some(st("H")));
        assert_eq!(break_to(st("RWH"), rd_h), Some(st("R")));
        assert_eq!(break_to(st("RWH"), wr_h), Some(st("")));
        assert_eq!(break_to(st("RW"), rd), Some(st("R")));
        assert_eq!(break_to(st("RH"), rd), None);
        assert_eq!(break_to(st("RH"), wr), Some(st("H")));
        assert_eq!(break_to(st("R"), rd), None);
        assert_eq!(break_to(st("R"), wr), Some(st("")));
        assert!(ack_required(st("RH")) && ack_required(st("RW")) && !ack_required(st("R")));
        assert_eq!(grantable(st("RWH"), true), st("RH"));
        assert_eq!(break_for_namespace(st("RWH")), Some(st("RW")));
        assert_eq!(break_for_namespace(st("RW")), None);
        assert_eq!(grantable(st("RWH"), false), st("RWH"));
    }

    #[test]
    fn windows_open_breaks() {
        // smbtorture smb2.lease.break's table: RWH contended becomes RH,
        // RW becomes R, R and RH stay.
        let lease = |held, hc, tr| break_to_on_open(st(held), hc, tr, false);
        assert_eq!(lease("RWH", false, false), Some(st("RH")));
        assert_eq!(lease("RW", false, false), Some(st("R")));
        assert_eq!(lease("RH", false, false), None);
        assert_eq!(lease("R", false, false), None);
        // smb2.lease.break_twice: a sharing conflict takes H alone.
        assert_eq!(lease("RH", true, false), Some(st("R")));
        assert_eq!(lease("RWH", true, false), Some(st("RW")));
        assert_eq!(lease("RW", true, false), None);
        assert_eq!(lease("R", false, true), Some(st("")));
        assert_eq!(lease("RH", false, true), Some(st("")));
    }

    #[test]
    fn windows_oplock_breaks_and_grants() {
        // smb2.replay.replay-dhv2-oplock2: a batch oplock meeting a
        // sharing violation breaks to level II, not to exclusive.
        let oplock = |held, hc, tr| break_to_on_open(st(held), hc, tr, true);
        assert_eq!(oplock("RWH", true, false), Some(st("R")));
        assert_eq!(oplock("RWH", false, false), Some(st("R")));
        assert_eq!(oplock("RW", false, false), Some(st("R")));
        assert_eq!(oplock("R", true, false), None);
        assert_eq!(oplock("RWH", false, true), Some(st("")));
        // A write or a lock takes R and RH leases to none.
        assert_eq!(break_for_write(st("R")), Some(st("")));
        assert_eq!(break_for_write(st("RH")), Some(st("")));
        assert_eq!(break_for_write(st("")), None);
        assert_eq!(break_for_write(st("RWH")), None);
        // smb2.lease.oplock: no oplock beside an RH lease, no H beside an
        // oplock; R leases and level II oplocks mix.
        assert_eq!(grantable_beside(st("R"), true, [(st("RH"), false)]), st(""));
        assert_eq!(grantable_beside(st("R"), true, [(st("R"), false)]), st("R"));
        assert_eq!(
            grantable_beside(st("RH"), true, [(st("R"), false)]),
            st("R")
        );
        assert_eq!(grantable_beside(st("RWH"), true, []), st("RWH"));
        assert_eq!(
            grantable_beside(st("RH"), false, [(st("R"), true)]),
            st("R")
        );
        assert_eq!(
            grantable_beside(st("RH"), false, [(st(""), true)]),
            st("RH")
        );
        assert_eq!(
            grantable_beside(st("RH"), false, [(st("RH"), false)]),
            st("RH")
        );
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(OPLOCK_KEY_TAG);
        assert!(is_oplock_key(&LeaseKey(Uuid::from_bytes(k))));
        assert!(!is_oplock_key(&LeaseKey(Uuid::from_bytes([1; 16]))));
    }

    fn any_state() -> impl Strategy<Value = LeaseState> {
        prop_oneof![
            Just(st("")),
            Just(st("R")),
            Just(st("RH")),
            Just(st("RW")),
            Just(st("RWH")),
            Just(st("H"))
        ]
    }

    proptest! {
        #[test]
        fn breaks_only_lower_and_stay_valid(held in any_state(), writes: bool, hc: bool) {
            if let Some(to) = break_to(held, BreakTrigger { writes, handle_conflict: hc }) {
                prop_assert!(held.contains(to) && to != held);
                prop_assert!(LeaseState::parse(&to.to_string()).is_some());
                prop_assert!(!to.contains(LeaseState::W));
                if writes { prop_assert!(!to.contains(LeaseState::R)); }
                if !writes { prop_assert_eq!(to.contains(LeaseState::R), held.contains(LeaseState::R)); }
                if hc { prop_assert!(!to.contains(LeaseState::H)); }
            }
        }

        #[test]
        fn nothing_to_break_means_compatible(held in any_state(), writes: bool, hc: bool) {
            if break_to(held, BreakTrigger { writes, handle_conflict: hc }).is_none() {
                prop_assert!(!held.contains(LeaseState::W));
                if writes { prop_assert!(!held.contains(LeaseState::R)); }
                if hc { prop_assert!(!held.contains(LeaseState::H)); }
            }
        }

        #[test]
        fn windows_breaks_only_lower(held in any_state(), hc: bool, tr: bool, op: bool) {
            if let Some(to) = break_to_on_open(held, hc, tr, op) {
                prop_assert!(held.contains(to) && to != held);
                prop_assert!(LeaseState::parse(&to.to_string()).is_some());
                if tr { prop_assert!(to.is_none()); }
            }
            if let Some(to) = break_for_write(held) {
                prop_assert!(held.contains(to) && to != held);
            }
        }

        #[test]
        fn break_chains_step_down_to_what_is_required(acked in any_state(), req in any_state()) {
            // Following the steps from any acknowledged state ends at what
            // the waiting opens need, each step a valid, strict lowering,
            // and read caching goes last.
            let mut at = acked;
            let mut steps = 0;
            while let Some(next) = next_break_step(at, req) {
                prop_assert!(at.contains(next) && next != at);
                prop_assert!(LeaseState::parse(&next.to_string()).is_some());
                if at.contains(LeaseState::R.with(LeaseState::H)) && !req.contains(LeaseState::H) {
                    prop_assert!(next.contains(LeaseState::R));
                }
                at = next;
                steps += 1;
                prop_assert!(steps <= 3);
            }
            prop_assert_eq!(at, req.and(acked));
        }

        #[test]
        fn an_open_waits_only_for_what_it_needs(held in any_state(), hc: bool, tr: bool) {
            if let Some(to) = break_to_on_open(held, hc, tr, false) {
                let waits = open_waits_for(held, to, hc);
                // Taking W always waits; taking only R and H without a
                // sharing conflict never does.
                if held.contains(LeaseState::W) { prop_assert!(waits); }
                if !held.contains(LeaseState::W) && !hc { prop_assert!(!waits); }
            }
        }

        #[test]
        fn grant_beside_never_exceeds_request(req in any_state(), op: bool, other in any_state(), oop: bool) {
            let g = grantable_beside(req, op, [(other, oop)]);
            prop_assert!(req.contains(g));
        }

        #[test]
        fn grant_never_exceeds_request(req in any_state(), others: bool) {
            let g = grantable(req, others);
            prop_assert!(req.contains(g));
            if others { prop_assert!(!g.contains(LeaseState::W)); }
        }
    }
}
