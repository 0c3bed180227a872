//! Lease breaks: filterd's `LeaseBreak` events become SMB2 lease break
//! notifications (MS-SMB2 2.2.23.2) on the connection that holds the
//! lease, and the client's LEASE_BREAK acknowledgment (2.2.24.2) goes
//! back to filterd (2.2.25.2 answers it).
//!
//! Each connection registers its writer here; a notification is written
//! by a short-lived thread of its own, so a client that does not read
//! stalls only that thread, never the events loop or other clients.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use libfilter::attach::AttachEvent;
use libfilter::lease::{LeaseKey, LeaseState};
use libfilter::proto::{Event, Reply as FilterReply, Request as FilterRequest};

use crate::files::status_of;
use crate::server::{Connection, Outcome, Reply, Request, Shared};
use crate::wire::{self, status, Header, Reader, Writer};

/// A connection's socket, shared by its thread and lease-break writers.
pub type ConnWriter = Arc<Mutex<TcpStream>>;

/// Who holds which lease, and how to reach each connection.
#[derive(Default)]
pub struct Notifier {
    writers: Mutex<HashMap<u64, ConnWriter>>,
    holders: Mutex<HashMap<LeaseKey, (u64, bool)>>,
}

impl Notifier {
    /// A connection starts: its writer can carry notifications.
    pub fn connected(&self, conn: u64, w: ConnWriter) {
        if let Ok(mut m) = self.writers.lock() {
            m.insert(conn, w);
        }
    }

    /// A connection ends: its leases are no longer reachable through it.
    pub fn disconnected(&self, conn: u64) {
        if let Ok(mut m) = self.writers.lock() {
            m.remove(&conn);
        }
        if let Ok(mut m) = self.holders.lock() {
            m.retain(|_, (c, _)| *c != conn);
        }
    }

    /// A lease was granted (or reconnected) on `conn`; `v2` decides the
    /// notification's epoch field.
    pub fn granted(&self, key: LeaseKey, conn: u64, v2: bool) {
        if let Ok(mut m) = self.holders.lock() {
            m.insert(key, (conn, v2));
        }
    }

    fn route(&self, key: &LeaseKey) -> Option<(ConnWriter, bool)> {
        let (conn, v2) = self.holders.lock().ok()?.get(key).copied()?;
        let w = self.writers.lock().ok()?.get(&conn).cloned()?;
        Some((w, v2))
    }
}

/// SMB lease state bits (R 1, H 2, W 4) of a filterd lease state.
pub fn lease_bits(s: LeaseState) -> u32 {
    [(LeaseState::R, 1), (LeaseState::H, 2), (LeaseState::W, 4)]
        .iter()
        .filter(|(st, _)| s.contains(*st))
        .map(|(_, b)| *b)
        .sum()
}

/// filterd's lease state of SMB lease state bits.
pub fn lease_state(bits: u32) -> LeaseState {
    let mut s = LeaseState::NONE;
    for (bit, st) in [(1, LeaseState::R), (2, LeaseState::H), (4, LeaseState::W)] {
        if bits & bit != 0 {
            s = s.with(st);
        }
    }
    s
}

/// The lease break notification (2.2.23.2), framed for TCP.
fn notification(key: LeaseKey, from: LeaseState, to: LeaseState, epoch: u16, ack: bool) -> Vec<u8> {
    let mut w = Writer::new();
    Header {
        credit_charge: 0,
        status: status::SUCCESS,
        command: 0x12,
        credits: 0,
        flags: wire::FLAG_RESPONSE,
        next_command: 0,
        message_id: u64::MAX,
        async_id: 0,
        tree_id: 0,
        session_id: 0,
        signature: [0; 16],
    }
    .encode(&mut w);
    w.u16(44).u16(epoch).u32(u32::from(ack));
    w.bytes(&key.0.to_bytes_le());
    w.u32(lease_bits(from)).u32(lease_bits(to));
    w.u32(0).u32(0).u32(0);
    let mut frame = wire::len32(w.len()).to_be_bytes().to_vec();
    frame.extend_from_slice(&w.0);
    frame
}

/// Forwards filterd's events for as long as the attachment lives.
pub fn forward(sh: Arc<Shared>) {
    while let Ok(ev) = sh.filter.events().recv() {
        let AttachEvent::Daemon(Event::LeaseBreak {
            lease_key,
            current_state,
            new_state,
            epoch,
            ack_required,
        }) = ev
        else {
            tracing::debug!(?ev, "filterd event");
            continue;
        };
        let Some((w, v2)) = sh.notifier.route(&lease_key) else {
            tracing::debug!(lease_key = %lease_key.0, "break for a lease no connection holds");
            continue;
        };
        let frame = notification(
            lease_key,
            current_state,
            new_state,
            if v2 { epoch } else { 0 },
            ack_required,
        );
        let spawned = std::thread::Builder::new()
            .name("lease-break".into())
            .spawn(move || {
                if let Ok(mut s) = w.lock() {
                    let _ = s.write_all(&frame);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not send a lease break");
        }
    }
}

/// OPLOCK_BREAK from the client: a lease break acknowledgment (2.2.24.2)
/// goes to filterd and is answered with the lease now held (2.2.25.2).
/// Oplock acknowledgments are refused: no oplocks are granted.
pub fn acknowledge(c: &mut Connection, req: &Request<'_>) -> Outcome {
    let mut r = Reader::new(req.body);
    if r.u16("structure size")? != 36 {
        return Err(status::INVALID_PARAMETER);
    }
    r.u16("reserved")?;
    r.u32("flags")?;
    let key_bytes = r.array::<16>("lease key")?;
    let state = r.u32("lease state")?;
    let key = LeaseKey(uuid::Uuid::from_bytes_le(key_bytes));
    let reply =
        c.sh.filter
            .client()
            .call(FilterRequest::LeaseBreakAck {
                lease_key: key,
                state: lease_state(state),
            })
            .map_err(|e| status_of(&e))?;
    let held = match reply.0 {
        FilterReply::Lease(l) => lease_bits(l.state),
        _ => state,
    };
    let mut w = Writer::new();
    w.u16(36).u16(0).u32(0).bytes(&key_bytes).u32(held).u64(0);
    Ok(Reply::ok(w.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_bits_roundtrip_and_notification_layout() {
        for b in 0..8 {
            assert_eq!(lease_bits(lease_state(b)), b);
        }
        let key = LeaseKey(uuid::Uuid::from_bytes_le([3; 16]));
        let f = notification(key, lease_state(7), lease_state(1), 2, true);
        assert_eq!(f.len(), 4 + 64 + 44);
        assert_eq!(&f[4 + 64..4 + 66], &44u16.to_le_bytes());
        assert_eq!(&f[4 + 72..4 + 88], &[3; 16]);
        assert_eq!(&f[4 + 88..4 + 96], &[7, 0, 0, 0, 1, 0, 0, 0]);
    }
}
