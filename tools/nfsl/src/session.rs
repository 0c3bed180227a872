//! [`Session`]: the client side of a session's exactly-once slot table, and
//! [`Seq`], the `seq` every op but EXCHANGE_ID, CREATE_SESSION and
//! DESTROY_CLIENTID carries.
//!
//! The server keeps, per slot, the last seqid it executed and that
//! request's reply: seqid = last + 1 executes and caches, seqid = last
//! returns the cached reply without executing, anything else is
//! `NFS4ERR_SEQ_MISORDERED`. The session mirrors that: per slot, the seqid
//! of the last request sent. [`Session::call`] sends a new request (last +
//! 1); [`Session::resend`] sends again with the same seqid, which is how a
//! client that lost a reply (timeout, connection loss, server failover)
//! gets the original one. Replies that reject the `seq` itself
//! ([`crate::SEQ_REJECTIONS`]) did not advance the server's slot, so the
//! session takes its slot back too, and the next [`Session::call`] reuses
//! that seqid.
//!
//! `NFS4ERR_DELAY` is among them: nfsshim never advances a slot for a
//! DELAY (whether filterd was unreachable or a delegation is being
//! recalled), so the next [`Session::call`] re-sends with the same seqid.
//!
//! A slot carries one request at a time; threads sharing a session use
//! different slots.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ops::{self, LockType, OpenArgs};
use crate::{Client, Error, Reply, StateId};

/// Most slots a [`Session`] tracks, whatever CREATE_SESSION offers: a
/// client need not use every slot the server has, and the table is sized
/// before any request is sent.
pub const MAX_SLOTS: usize = 1024;

/// A request's `seq`: which session, which slot, which request on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Seq {
    /// From CREATE_SESSION.
    pub sessionid: String,
    /// Index into the session's slot table.
    pub slot: u32,
    /// Last executed seqid of the slot + 1 for a new request; the same
    /// for a re-send.
    pub seqid: u32,
}

impl Seq {
    /// The `seq` object.
    pub fn to_json(&self) -> Value {
        serde_json::json!({"sessionid": self.sessionid, "slot": self.slot, "seqid": self.seqid})
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The table is a Vec of integers updated one element at a time; a panic
    // elsewhere cannot leave it inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One session on one connection, with the client side of its slot table.
/// Shareable by threads (`&self` everywhere), one slot per thread.
#[derive(Debug)]
pub struct Session {
    client: Arc<Client>,
    sessionid: String,
    /// Per slot, the seqid of the last request sent (0: none yet).
    slots: Mutex<Vec<u32>>,
}

impl Session {
    /// A session of `slots` slots (at most [`MAX_SLOTS`]), none used yet.
    pub fn new(client: Arc<Client>, sessionid: impl Into<String>, slots: usize) -> Session {
        Session {
            client,
            sessionid: sessionid.into(),
            slots: Mutex::new(vec![0; slots.min(MAX_SLOTS)]),
        }
    }

    /// The session a CREATE_SESSION reply describes (its `sessionid` and
    /// `slots`); `None` when the reply lacks either (a failure status).
    pub fn from_reply(client: Arc<Client>, reply: &Reply) -> Option<Session> {
        let sessionid = reply.sessionid()?.to_owned();
        let slots = reply.get("slots")?.as_u64()?;
        let slots = usize::try_from(slots).unwrap_or(MAX_SLOTS);
        Some(Session::new(client, sessionid, slots))
    }

    /// The same session and slot table, sent over another connection: after
    /// a lost connection or a server failover, re-send the last request of
    /// each slot through the result and get the original replies.
    pub fn with_client(&self, client: Arc<Client>) -> Session {
        Session {
            client,
            sessionid: self.sessionid.clone(),
            slots: Mutex::new(lock(&self.slots).clone()),
        }
    }

    /// The connection requests go over.
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// The session's id.
    pub fn sessionid(&self) -> &str {
        &self.sessionid
    }

    /// How many slots the table has.
    pub fn slot_count(&self) -> usize {
        lock(&self.slots).len()
    }

    /// Per slot, the seqid of the last request sent (0: none yet).
    pub fn last_seqids(&self) -> Vec<u32> {
        lock(&self.slots).clone()
    }

    /// A `seq` of this session with any slot and seqid, checked against
    /// nothing and recorded nowhere: for tests of `NFS4ERR_BADSLOT` and
    /// `NFS4ERR_SEQ_MISORDERED`, sent with [`Client::call_seq`].
    pub fn seq(&self, slot: u32, seqid: u32) -> Seq {
        Seq {
            sessionid: self.sessionid.clone(),
            slot,
            seqid,
        }
    }

    /// The `seq` of a new request on `slot`, advancing the slot: the last
    /// seqid + 1 (wrapping from `u32::MAX` to 0).
    pub fn next_seq(&self, slot: u32) -> Result<Seq, Error> {
        let mut slots = lock(&self.slots);
        let slot_count = slots.len();
        let last = usize::try_from(slot)
            .ok()
            .and_then(|i| slots.get_mut(i))
            .ok_or(Error::NoSuchSlot {
                slot,
                slots: slot_count,
            })?;
        *last = last.wrapping_add(1);
        Ok(self.seq(slot, *last))
    }

    /// The `seq` of the last request sent on `slot`, to re-send it.
    pub fn last_seq(&self, slot: u32) -> Result<Seq, Error> {
        let slots = lock(&self.slots);
        let last = usize::try_from(slot)
            .ok()
            .and_then(|i| slots.get(i).copied())
            .ok_or(Error::NoSuchSlot {
                slot,
                slots: slots.len(),
            })?;
        if last == 0 {
            return Err(Error::NothingToResend { slot });
        }
        Ok(self.seq(slot, last))
    }

    /// Sends `req` as a new request on `slot`. When the reply rejects the
    /// `seq` ([`Reply::rejects_seq`]) the slot is taken back, so the next
    /// call reuses the seqid.
    pub fn call(&self, slot: u32, mut req: Value) -> Result<Reply, Error> {
        if let Some(obj) = req.as_object_mut() {
            obj.remove("xid");
        }
        self.call_keeping_xid(slot, req)
    }

    /// As [`Session::call`], but a u64 `xid` in `req` is sent as is
    /// ([`Client::call_keeping_xid`]); without one a fresh xid is used.
    pub fn call_keeping_xid(&self, slot: u32, mut req: Value) -> Result<Reply, Error> {
        let Some(obj) = req.as_object_mut() else {
            return Err(Error::NotAnObject);
        };
        let seq = self.next_seq(slot)?;
        obj.insert("seq".into(), seq.to_json());
        let reply = match self.client.call_keeping_xid(req) {
            Ok(r) => r,
            Err(e) => {
                // Nothing was sent for these: the slot is as it was.
                if matches!(e, Error::XidInUse(_)) {
                    self.take_back(&seq);
                }
                return Err(e);
            }
        };
        if reply.rejects_seq() {
            self.take_back(&seq);
        }
        Ok(reply)
    }

    /// Sends `req` again on `slot` with the seqid of the last request sent
    /// there: the server answers with that request's cached reply, without
    /// executing anything (whatever `req` now says).
    pub fn resend(&self, slot: u32, req: Value) -> Result<Reply, Error> {
        let seq = self.last_seq(slot)?;
        self.client.call_seq(&seq, req)
    }

    /// Undoes `next_seq` for `seq`, unless the slot moved on meanwhile.
    pub(crate) fn take_back(&self, seq: &Seq) {
        let mut slots = lock(&self.slots);
        if let Some(last) = usize::try_from(seq.slot)
            .ok()
            .and_then(|i| slots.get_mut(i))
        {
            if *last == seq.seqid {
                *last = seq.seqid.wrapping_sub(1);
            }
        }
    }

    /// OPEN on `slot`.
    pub fn open(&self, slot: u32, args: &OpenArgs) -> Result<Reply, Error> {
        self.call(slot, ops::open(args))
    }

    /// READ on `slot`; [`Reply::data`] decodes the bytes.
    pub fn read(
        &self,
        slot: u32,
        stateid: &StateId,
        offset: u64,
        count: u64,
    ) -> Result<Reply, Error> {
        self.call(slot, ops::read(stateid, offset, count))
    }

    /// WRITE on `slot`.
    pub fn write(
        &self,
        slot: u32,
        stateid: &StateId,
        offset: u64,
        data: &[u8],
    ) -> Result<Reply, Error> {
        self.call(slot, ops::write(stateid, offset, data))
    }

    /// COMMIT on `slot`.
    pub fn commit(&self, slot: u32, stateid: &StateId) -> Result<Reply, Error> {
        self.call(slot, ops::commit(stateid))
    }

    /// LOCK on `slot`; [`Reply::lock_stateid`] names the lock state,
    /// [`Reply::denied`] the conflicting lock.
    pub fn lock(
        &self,
        slot: u32,
        stateid: &StateId,
        owner: &str,
        lock_type: LockType,
        offset: u64,
        length: u64,
    ) -> Result<Reply, Error> {
        self.call(slot, ops::lock(stateid, owner, lock_type, offset, length))
    }

    /// LOCKU on `slot`.
    pub fn locku(
        &self,
        slot: u32,
        lock_stateid: &StateId,
        offset: u64,
        length: u64,
    ) -> Result<Reply, Error> {
        self.call(slot, ops::locku(lock_stateid, offset, length))
    }

    /// CLOSE on `slot`.
    pub fn close(&self, slot: u32, stateid: &StateId) -> Result<Reply, Error> {
        self.call(slot, ops::close(stateid))
    }

    /// DELEGRETURN on `slot`.
    pub fn delegreturn(&self, slot: u32, stateid: &StateId) -> Result<Reply, Error> {
        self.call(slot, ops::delegreturn(stateid))
    }

    /// REMOVE on `slot`.
    pub fn remove(&self, slot: u32, path: &str) -> Result<Reply, Error> {
        self.call(slot, ops::remove(path))
    }

    /// RENAME on `slot`.
    pub fn rename(&self, slot: u32, from: &str, to: &str) -> Result<Reply, Error> {
        self.call(slot, ops::rename(from, to))
    }

    /// RECLAIM_COMPLETE on `slot`.
    pub fn reclaim_complete(&self, slot: u32) -> Result<Reply, Error> {
        self.call(slot, ops::reclaim_complete())
    }

    /// DESTROY_SESSION on `slot`.
    pub fn destroy_session(&self, slot: u32) -> Result<Reply, Error> {
        self.call(slot, ops::destroy_session())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fake, recv_line, send, wait_close};
    use serde_json::json;
    use std::time::Duration;

    /// A fake server that answers each request with `status`, echoing its
    /// `seq`, for as many statuses as given.
    fn echo_seq(statuses: Vec<&'static str>) -> (Arc<Client>, std::thread::JoinHandle<()>) {
        let (addr, server) = fake(move |mut r, mut w| {
            for status in statuses {
                let req = recv_line(&mut r);
                send(
                    &mut w,
                    json!({"xid": req["xid"], "status": status, "seq": req["seq"], "op": req["op"]}),
                );
            }
            wait_close(&mut r);
        });
        let c = Client::connect(addr).unwrap();
        c.set_timeout(Duration::from_secs(10));
        (Arc::new(c), server)
    }

    fn seqid(r: &Reply) -> (u64, u64) {
        let s = r.get("seq").unwrap();
        (s["slot"].as_u64().unwrap(), s["seqid"].as_u64().unwrap())
    }

    #[test]
    fn seqids_advance_per_slot_and_resend_reuses_them() {
        let (c, server) = echo_seq(vec!["NFS4_OK"; 5]);
        let s = Session::new(c, "S1", 8);
        let sid = StateId {
            other: "o".into(),
            seqid: 0,
        };
        assert_eq!(seqid(&s.write(0, &sid, 0, b"a").unwrap()), (0, 1));
        assert_eq!(seqid(&s.write(0, &sid, 1, b"b").unwrap()), (0, 2));
        assert_eq!(seqid(&s.commit(3, &sid).unwrap()), (3, 1));
        let again = s.resend(0, ops::write(&sid, 1, b"b")).unwrap();
        assert_eq!(seqid(&again), (0, 2));
        assert_eq!(again.get("op"), Some(&json!("WRITE")));
        assert_eq!(again.get("seq").unwrap()["sessionid"], "S1");
        assert_eq!(seqid(&s.remove(0, "f").unwrap()), (0, 3));
        assert_eq!(s.last_seqids(), vec![3, 0, 0, 1, 0, 0, 0, 0]);
        drop(s);
        server.join().unwrap();
    }

    #[test]
    fn seq_rejections_take_the_slot_back() {
        let (c, server) = echo_seq(vec![
            "NFS4_OK",
            "NFS4ERR_SEQ_MISORDERED",
            "NFS4ERR_BADSESSION",
            "NFS4ERR_DELAY",
            "NFS4_OK",
            "NFS4ERR_BADSLOT",
        ]);
        let s = Session::new(c, "S1", 2);
        assert_eq!(seqid(&s.reclaim_complete(1).unwrap()), (1, 1));
        // Rejected twice: seqid 2 is used again each time.
        assert_eq!(seqid(&s.reclaim_complete(1).unwrap()), (1, 2));
        assert_eq!(seqid(&s.reclaim_complete(1).unwrap()), (1, 2));
        // A DELAY takes the slot back too.
        assert_eq!(seqid(&s.reclaim_complete(1).unwrap()), (1, 2));
        assert_eq!(seqid(&s.reclaim_complete(1).unwrap()), (1, 2));
        // An explicit seq touches no slot.
        let bad = s
            .client()
            .call_seq(&s.seq(99, 1), ops::reclaim_complete())
            .unwrap();
        assert_eq!(bad.status(), "NFS4ERR_BADSLOT");
        assert_eq!(seqid(&bad), (99, 1));
        assert_eq!(s.last_seqids(), vec![0, 2]);
        drop(s);
        server.join().unwrap();
    }

    #[test]
    fn slot_errors_send_nothing() {
        let (c, server) = echo_seq(vec![]);
        let s = Session::new(c, "S1", 2);
        assert!(matches!(
            s.next_seq(2),
            Err(Error::NoSuchSlot { slot: 2, slots: 2 })
        ));
        assert!(matches!(
            s.resend(0, ops::reclaim_complete()),
            Err(Error::NothingToResend { slot: 0 })
        ));
        assert!(matches!(s.call(0, json!("x")), Err(Error::NotAnObject)));
        assert_eq!(s.last_seqids(), vec![0, 0]);
        drop(s);
        server.join().unwrap();
    }

    #[test]
    fn from_reply_and_with_client_keep_the_table() {
        let (c, server) = echo_seq(vec!["NFS4_OK"]);
        let created = Reply::new(
            json!({"xid": 2, "status": "NFS4_OK", "sessionid": "S9", "slots": 1_u64 << 40,
                   "lease_ms": 90000}),
        );
        let big = Session::from_reply(c.clone(), &created).unwrap();
        assert_eq!(big.sessionid(), "S9");
        assert_eq!(big.slot_count(), MAX_SLOTS);
        drop(big);
        let failed = Reply::new(json!({"xid": 2, "status": "NFS4ERR_STALE_CLIENTID"}));
        assert!(Session::from_reply(c.clone(), &failed).is_none());

        let s = Session::new(c.clone(), "S9", 2);
        s.next_seq(1).unwrap();
        // The same table over "another" connection (the same one here).
        let moved = s.with_client(c);
        let r = moved.resend(1, ops::reclaim_complete()).unwrap();
        assert_eq!(seqid(&r), (1, 1));
        drop((s, moved));
        server.join().unwrap();
    }
}
