//! Credits, and the message ids they let a client send on one connection
//! (MS-SMB2 3.3.1.1, 3.3.1.2, 3.3.5.2.3).
//!
//! A connection starts with the id 0 allowed; every credit a response
//! grants allows the next id. A request uses its id — a multi-credit one
//! (SMB 2.1 and later) `CreditCharge` consecutive ids — and no id is ever
//! allowed twice. A request whose ids were not granted, or were used
//! already, ends the connection before anything of its compound runs:
//! without the check a client could send any number of requests past its
//! credits, and one whose message id repeats an earlier one's was run
//! again (both answers carrying the same id).

use std::collections::BTreeSet;

use crate::wire::Command;

/// Credits a client may hold at once (clients treat more than 65535 as a
/// broken server). One response may grant them all: smbtorture's
/// smb2.credits asks for 65535 in one request and wants at least 8192
/// back, as Windows Server 2016 and Samba grant.
pub const MAX_CREDITS: u32 = 8192;
/// How far past the lowest id not yet used the granted ids may reach
/// (3.3.1.1 lets a server bound it): a client that leaves one id unused
/// cannot make the server remember ever more ids used after it.
pub const MAX_RANGE: u64 = 2 * MAX_CREDITS as u64;

/// The message ids one connection's client may use, and so its credits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credits {
    /// Every id below it was used.
    low: u64,
    /// The ids from `low` below it were granted.
    end: u64,
    /// Ids at or past `low` used already, out of order.
    used: BTreeSet<u64>,
}

impl Default for Credits {
    /// A new connection's: the id 0 (3.3.1.1).
    fn default() -> Self {
        Credits {
            low: 0,
            end: 1,
            used: BTreeSet::new(),
        }
    }
}

impl Credits {
    /// Credits the client holds: ids granted and not used.
    pub fn held(&self) -> u32 {
        let free = (self.end - self.low).saturating_sub(self.used.len() as u64);
        u32::try_from(free).unwrap_or(u32::MAX)
    }

    /// Uses the `count` ids from `first` (count at least 1). False, and
    /// nothing used, when one of them was not granted or was used already.
    pub fn take(&mut self, first: u64, count: u64) -> bool {
        let Some(past) = first.checked_add(count.max(1)) else {
            return false; // the 64-bit sequence would wrap
        };
        if first < self.low || past > self.end || self.used.range(first..past).next().is_some() {
            return false;
        }
        if first == self.low {
            self.low = past;
        } else {
            self.used.extend(first..past);
        }
        while self.used.first() == Some(&self.low) {
            self.used.pop_first();
            self.low += 1;
        }
        true
    }

    /// The credits granted since these credits were `before` (a copy made
    /// after the requests answered used their ids).
    pub fn granted_since(&self, before: &Credits) -> u64 {
        self.end.saturating_sub(before.end)
    }

    /// Adds `granted` credits granted on a copy of these credits: a
    /// channel's PDU is answered on such a copy by the session's home
    /// thread while the channel answers other requests of its socket. The
    /// grants of both add up, so [`MAX_CREDITS`] and [`MAX_RANGE`] may be
    /// passed by the grants of the requests answered meanwhile (at most
    /// one PDU's per nested wait).
    pub fn add_granted(&mut self, granted: u64) {
        self.end = self.end.saturating_add(granted);
    }

    /// Grants credits for a response to a request that asked for `asked`:
    /// what it asked for, never so many that the client holds more than
    /// [`MAX_CREDITS`] or its ids reach [`MAX_RANGE`] past the lowest
    /// unused one, and always one when it holds none.
    pub fn grant(&mut self, asked: u16) -> u16 {
        let held = self.held();
        let reach = self.low.saturating_add(MAX_RANGE).saturating_sub(self.end);
        let room = MAX_CREDITS
            .saturating_sub(held)
            .min(u32::try_from(reach).unwrap_or(u32::MAX));
        let mut grant = u32::from(asked).min(room);
        if grant == 0 && held == 0 {
            grant = 1; // a client must never be left without a credit
        }
        self.end = self.end.saturating_add(u64::from(grant));
        u16::try_from(grant).unwrap_or(1)
    }
}

/// The larger of what a request sends and what its response may carry,
/// for the commands whose CreditCharge must cover it (MS-SMB2 3.3.5.2.5):
/// READ and WRITE their Length, IOCTL its input and output buffers against
/// its MaxInputResponse + MaxOutputResponse, QUERY_DIRECTORY and
/// CHANGE_NOTIFY their OutputBufferLength, QUERY_INFO the larger of its
/// input and output lengths, SET_INFO its BufferLength. `None` for other
/// commands, and for a body too short to hold the field (the command
/// itself refuses that).
pub fn payload_size(cmd: Command, body: &[u8]) -> Option<u64> {
    let at = |o: usize| -> Option<u64> {
        let b: [u8; 4] = body.get(o..o + 4)?.try_into().ok()?;
        Some(u64::from(u32::from_le_bytes(b)))
    };
    match cmd {
        Command::Read | Command::Write | Command::ChangeNotify | Command::SetInfo => at(4),
        Command::QueryDirectory => at(28),
        Command::QueryInfo => Some(at(4)?.max(at(12)?)),
        Command::Ioctl => {
            let sent = at(28)? + at(40)?;
            let expected = at(32)? + at(44)?;
            Some(sent.max(expected))
        }
        _ => None,
    }
}

/// Whether a CreditCharge covers `size` bytes of payload (3.3.5.2.5): one
/// credit for every 64 KiB begun, a charge of 0 counting as one. A request
/// it does not cover is `STATUS_INVALID_PARAMETER`: without the check a
/// client could move megabytes on the message ids of one credit.
pub fn charge_covers(charge: u16, size: u64) -> bool {
    size.saturating_sub(1) / 65_536 < u64::from(charge.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_charge_covers_64_kib_a_credit() {
        for (charge, size, covered) in [
            (0, 0, true),
            (0, 65_536, true),
            (0, 65_537, false),
            (1, 65_536, true),
            (1, 65_537, false),
            (2, 131_072, true),
            (2, 131_073, false),
            (128, 8 << 20, true),
            (127, 8 << 20, false),
        ] {
            assert_eq!(charge_covers(charge, size), covered, "{charge} {size}");
        }
    }

    #[test]
    fn payload_sizes_come_from_each_commands_fields() {
        let mut body = vec![0u8; 56];
        body[4..8].copy_from_slice(&100_000u32.to_le_bytes());
        body[12..16].copy_from_slice(&200_000u32.to_le_bytes());
        body[28..32].copy_from_slice(&300_000u32.to_le_bytes());
        body[32..36].copy_from_slice(&1u32.to_le_bytes());
        body[40..44].copy_from_slice(&5u32.to_le_bytes());
        body[44..48].copy_from_slice(&65_536u32.to_le_bytes());
        assert_eq!(payload_size(Command::Read, &body), Some(100_000));
        assert_eq!(payload_size(Command::Write, &body), Some(100_000));
        assert_eq!(payload_size(Command::QueryInfo, &body), Some(200_000));
        assert_eq!(payload_size(Command::QueryDirectory, &body), Some(300_000));
        // IOCTL: input 300 000 + output 5 sent, 1 + 65 536 expected.
        assert_eq!(payload_size(Command::Ioctl, &body), Some(300_005));
        assert_eq!(payload_size(Command::Create, &body), None);
        assert_eq!(payload_size(Command::Ioctl, &body[..40]), None);
    }

    #[test]
    fn ids_are_used_once_each_and_only_when_granted() {
        let mut c = Credits::default();
        assert!(!c.take(1, 1), "only 0 before any grant");
        assert!(c.take(0, 1));
        assert!(!c.take(0, 1), "0 again");
        assert_eq!(c.held(), 0);
        assert_eq!(c.grant(0), 1, "never left without a credit");
        assert_eq!(c.grant(8), 8);
        assert_eq!(c.held(), 9); // ids 1 ..= 9
        assert!(c.take(5, 1), "out of order");
        assert!(!c.take(5, 1), "5 again");
        assert!(!c.take(4, 2), "a range over 5");
        assert!(c.take(1, 4), "a multi-credit range below it");
        assert_eq!((c.low, c.used.len()), (6, 0), "the hole closed");
        assert!(!c.take(9, 2), "a range past the grant");
        assert!(c.take(9, 1));
        assert!(!c.take(u64::MAX, 2), "a wrap");
        assert_eq!(c.held(), 3); // 6, 7, 8
    }

    #[test]
    fn grants_stop_at_the_cap_and_the_range() {
        let mut c = Credits::default();
        for _ in 0..100 {
            c.grant(u16::MAX);
        }
        assert_eq!(c.held(), MAX_CREDITS);
        assert_eq!(c.grant(512), 0);
        // One response may grant them all (smbtorture's smb2.credits).
        let mut c = Credits::default();
        assert!(c.take(0, 1));
        assert_eq!(u32::from(c.grant(u16::MAX)), MAX_CREDITS);
        // A client that leaves id 0 unused and uses everything after it:
        // the ids it may reach stop MAX_RANGE past 0.
        let mut c = Credits::default();
        let mut next = 1;
        for _ in 0..10_000 {
            c.grant(512);
            while c.take(next, 1) {
                next += 1;
            }
        }
        assert_eq!(c.end, MAX_RANGE);
        assert_eq!(c.used.len() as u64, MAX_RANGE - 1);
        assert!(c.take(0, 1));
        assert!(c.used.is_empty() && c.low == MAX_RANGE);
    }

    #[test]
    fn grants_made_on_a_copy_add_up_with_the_ids_used_meanwhile() {
        // A channel uses its forwarded PDU's id (0), hands the home a copy;
        // meanwhile it answers another request itself (id 1, granted 4).
        let mut c = Credits::default();
        assert_eq!(c.grant(1), 1);
        assert!(c.take(0, 1));
        let sent = c.clone();
        assert!(c.take(1, 1));
        c.grant(4);
        let mut home = sent.clone();
        assert_eq!(home.grant(8), 8);
        c.add_granted(home.granted_since(&sent));
        assert!(!c.take(0, 1) && !c.take(1, 1), "ids used stay used");
        assert_eq!(c.held(), 12, "ids 2 ..= 13: both answers' grants");
        assert!(c.take(13, 1) && !c.take(14, 1));
    }

    proptest! {
        /// Against a plain set of the ids used: any order of takes and
        /// grants, the same answers, and the held count is the ids
        /// granted and not used.
        #[test]
        fn take_and_grant_agree_with_a_set(
            steps in proptest::collection::vec((0u64..64, 1u64..6, 0u16..8), 1..200)
        ) {
            let mut c = Credits::default();
            let mut used = std::collections::HashSet::new();
            let mut end = 1u64;
            for (first, count, asked) in steps {
                let ok = first + count <= end && (first..first + count).all(|i| !used.contains(&i));
                prop_assert_eq!(c.take(first, count), ok);
                if ok {
                    used.extend(first..first + count);
                }
                end += u64::from(c.grant(asked));
                prop_assert_eq!(u64::from(c.held()), end - used.len() as u64);
            }
        }
    }
}
