//! The OPEN and CLOSE of a loop of opens (benchmarks, load) without a JSON
//! tree: the request written with serde's writer straight from
//! [`OpenArgs`] and the slot's [`Seq`], the reply's few fields the loop
//! looks at (status, stateid) read borrowed from its line ([`Outcome`]).
//! The lines are byte for byte those of [`Session::open`] and
//! [`Session::close`] (keys in the order a `Value` map writes them;
//! `typed_lines_are_the_maps_bytes`), so the server sees no difference,
//! and the slot table moves as [`Session::call`] moves it. Issue #16:
//! building and parsing `Value`s was most of the bench clients' own CPU
//! per pair (smbl's `create_outcome` did the same for smbl/1).

use serde::Serialize;
use serde_json::Value;

use crate::ops::{Access, CreateMode, Deny, WantDelegation};
use crate::reply::SEQ_REJECTIONS;
use crate::{Error, OpenArgs, Reply, Seq, Session, StateId, StatusError, NFS4_OK};

/// A request's `seq`; fields in a `Value` map's (sorted) order.
#[derive(Serialize)]
struct SeqLine<'a> {
    seqid: u32,
    sessionid: &'a str,
    slot: u32,
}

impl<'a> From<&'a Seq> for SeqLine<'a> {
    fn from(s: &'a Seq) -> SeqLine<'a> {
        SeqLine {
            seqid: s.seqid,
            sessionid: &s.sessionid,
            slot: s.slot,
        }
    }
}

fn is_none(w: &WantDelegation) -> bool {
    *w == WantDelegation::None
}

/// OPEN's line; fields in a `Value` map's (sorted) order.
#[derive(Serialize)]
struct OpenLine<'a> {
    access: Access,
    #[serde(skip_serializing_if = "Option::is_none")]
    create: Option<CreateLine<'a>>,
    deny: Deny,
    op: &'static str,
    owner: &'a str,
    path: &'a str,
    seq: SeqLine<'a>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncate: bool,
    #[serde(skip_serializing_if = "is_none")]
    want_delegation: WantDelegation,
    xid: u64,
}

#[derive(Serialize)]
struct CreateLine<'a> {
    mode: CreateMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    verifier: Option<&'a str>,
}

/// CLOSE's line; fields in a `Value` map's (sorted) order (a [`StateId`]
/// writes `other` before `seqid`, as a map does).
#[derive(Serialize)]
struct CloseLine<'a> {
    op: &'static str,
    seq: SeqLine<'a>,
    stateid: &'a StateId,
    xid: u64,
}

fn write_open(args: &OpenArgs, seq: &Seq, xid: u64, out: &mut Vec<u8>) {
    let line = OpenLine {
        access: args.access,
        create: args.create.as_ref().map(|(mode, verifier)| CreateLine {
            mode: *mode,
            verifier: verifier.as_deref(),
        }),
        deny: args.deny,
        op: "OPEN",
        owner: &args.owner,
        path: &args.path,
        seq: seq.into(),
        truncate: args.truncate,
        want_delegation: args.want_delegation,
        xid,
    };
    // Writing these types into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &line);
}

fn write_close(stateid: &StateId, seq: &Seq, xid: u64, out: &mut Vec<u8>) {
    let line = CloseLine {
        op: "CLOSE",
        seq: seq.into(),
        stateid,
        xid,
    };
    // Writing these types into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &line);
}

/// The fields of a reply [`Outcome`] reads, borrowed from the line. A line
/// that does not fit (an escaped string, a repeated key, a `stateid` that
/// is not an object) is read through a `Value` instead.
#[derive(serde::Deserialize)]
struct OutcomeLine<'a> {
    status: Option<&'a str>,
    #[serde(borrow)]
    stateid: Option<StateIdLine<'a>>,
}

#[derive(serde::Deserialize)]
struct StateIdLine<'a> {
    other: &'a str,
    seqid: u64,
}

/// An OPEN's or CLOSE's reply, read without a JSON tree: its status, the
/// `stateid` (as [`Reply::stateid`] reads it), and the line itself for
/// anything else ([`Outcome::reply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    status: String,
    stateid: Option<StateId>,
    line: Vec<u8>,
}

impl Outcome {
    fn of(session: &Session, line: Vec<u8>) -> Result<Outcome, Error> {
        let (status, stateid) = match serde_json::from_slice::<OutcomeLine>(&line) {
            Ok(o) => (
                o.status.unwrap_or("").to_owned(),
                o.stateid.and_then(|s| {
                    Some(StateId {
                        other: s.other.to_owned(),
                        seqid: u32::try_from(s.seqid).ok()?,
                    })
                }),
            ),
            Err(_) => {
                let r = Reply::new(session.client().value_of(&line)?);
                (r.status().to_owned(), r.stateid())
            }
        };
        Ok(Outcome {
            status,
            stateid,
            line,
        })
    }

    /// The `status` field (`""` when the server sent none).
    pub fn status(&self) -> &str {
        &self.status
    }

    /// Whether the status is `NFS4_OK`.
    pub fn is_ok(&self) -> bool {
        self.status == NFS4_OK
    }

    /// Whether the status rejects the request's `seq` itself
    /// ([`SEQ_REJECTIONS`]): the slot did not advance.
    pub fn rejects_seq(&self) -> bool {
        SEQ_REJECTIONS.contains(&self.status.as_str())
    }

    /// `stateid` (OPEN, CLOSE).
    pub fn stateid(&self) -> Option<&StateId> {
        self.stateid.as_ref()
    }

    /// The reply line as received (without its `\n`).
    pub fn line(&self) -> &[u8] {
        &self.line
    }

    /// The whole reply, parsed.
    pub fn reply(&self) -> Reply {
        Reply::new(serde_json::from_slice(&self.line).unwrap_or(Value::Null))
    }

    /// `Ok(self)` when the status is `NFS4_OK`, else the status as an error
    /// ([`Reply::require_ok`]'s).
    pub fn require_ok(self) -> Result<Outcome, StatusError> {
        if self.is_ok() {
            return Ok(self);
        }
        match self.reply().require_ok() {
            Err(e) => Err(e),
            // The tree disagrees with the fields read (cannot happen for a
            // line both read): still a failure.
            Ok(r) => Err(StatusError {
                status: self.status,
                error: None,
                reply: r.into_value(),
            }),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.line))
    }
}

impl Session {
    /// Sends the line `write` writes as a new request on `slot`, as
    /// [`Session::call`] does (the slot taken back when the reply rejects
    /// the `seq`), and reads the reply as an [`Outcome`].
    fn call_outcome(
        &self,
        slot: u32,
        write: impl FnOnce(&Seq, u64, &mut Vec<u8>),
    ) -> Result<Outcome, Error> {
        let seq = self.next_seq(slot)?;
        // A fresh xid is never in use: the slot moves back only on a
        // rejecting reply.
        let line = self.client().call_line(|xid, out| write(&seq, xid, out))?;
        let outcome = Outcome::of(self, line)?;
        if outcome.rejects_seq() {
            self.take_back(&seq);
        }
        Ok(outcome)
    }

    /// [`Session::open`] without a JSON tree: the same request line, the
    /// reply as an [`Outcome`].
    pub fn open_outcome(&self, slot: u32, args: &OpenArgs) -> Result<Outcome, Error> {
        self.call_outcome(slot, |seq, xid, out| write_open(args, seq, xid, out))
    }

    /// [`Session::close`] without a JSON tree: the same request line, the
    /// reply as an [`Outcome`].
    pub fn close_outcome(&self, slot: u32, stateid: &StateId) -> Result<Outcome, Error> {
        self.call_outcome(slot, |seq, xid, out| write_close(stateid, seq, xid, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;
    use crate::testing::{fake, recv_line, send, wait_close};
    use crate::Client;
    use serde_json::json;
    use std::sync::Arc;
    use std::time::Duration;

    /// `req` as [`Session::call`] sends it: with `seq` and `xid`.
    fn as_sent(mut req: Value, seq: &Seq, xid: u64) -> Vec<u8> {
        if let Some(m) = req.as_object_mut() {
            m.insert("seq".into(), seq.to_json());
            m.insert("xid".into(), json!(xid));
        }
        serde_json::to_vec(&req).unwrap_or_default()
    }

    /// The typed lines are the bytes the `Value` requests write.
    #[test]
    fn typed_lines_are_the_maps_bytes() {
        let seq = Seq {
            sessionid: "s\"1\\\u{e9}".into(),
            slot: u32::MAX,
            seqid: 7,
        };
        let mut a = OpenArgs::new("o\n1", "d/\"f\"\u{e9}");
        let creates = [
            None,
            Some((CreateMode::Unchecked, None)),
            Some((CreateMode::Exclusive, Some("00112233aabbccdd".to_owned()))),
        ];
        for (i, create) in creates.into_iter().enumerate() {
            a.create = create;
            a.truncate = i == 1;
            a.want_delegation = [
                WantDelegation::None,
                WantDelegation::Read,
                WantDelegation::Write,
            ][i];
            a.access = [Access::Read, Access::Write, Access::Both][i];
            a.deny = [Deny::None, Deny::Read, Deny::Both][i];
            let mut typed = Vec::new();
            write_open(&a, &seq, u64::MAX, &mut typed);
            assert_eq!(
                String::from_utf8_lossy(&typed),
                String::from_utf8_lossy(&as_sent(ops::open(&a), &seq, u64::MAX))
            );
        }
        let s = StateId {
            other: "x\\y".into(),
            seqid: u32::MAX,
        };
        let mut typed = Vec::new();
        write_close(&s, &seq, 9, &mut typed);
        assert_eq!(
            String::from_utf8_lossy(&typed),
            String::from_utf8_lossy(&as_sent(ops::close(&s), &seq, 9))
        );
    }

    #[test]
    fn outcome_lines_read_as_reply_reads_them() {
        let lines: [&[u8]; 6] = [
            br#"{"xid":1,"status":"NFS4_OK","stateid":{"other":"o-2","seqid":3},"delegation":null}"#,
            br#"{"xid":1,"status":"NFS4_OK","stateid":{"other":"o","seqid":4294967296}}"#,
            br#"{"xid":1,"status":"NFS4ERR_DELAY","stateid":null}"#,
            br#"{"xid":1}"#,
            // Escapes and odd shapes do not borrow: read through a Value.
            br#"{"xid":1,"status":"NFS4\u005fOK","stateid":{"other":"a\"b","seqid":1}}"#,
            br#"{"xid":1,"status":"NFS4_OK","stateid":[1,2]}"#,
        ];
        let (addr, server) = fake(|mut r, _w| wait_close(&mut r));
        let s = Session::new(Arc::new(Client::connect(addr).expect("connect")), "s", 1);
        for line in lines {
            let o = Outcome::of(&s, line.to_vec()).expect("a JSON object");
            let r = Reply::new(serde_json::from_slice(line).expect("JSON"));
            assert_eq!(o.status(), r.status(), "{o}");
            assert_eq!(o.stateid().cloned(), r.stateid(), "{o}");
            assert_eq!(o.rejects_seq(), r.rejects_seq(), "{o}");
            assert_eq!(o.clone().require_ok().is_ok(), r.is_ok(), "{o}");
        }
        drop(s);
        server.join().expect("fake server");
    }

    /// The typed calls move the slot table as `Session::call` does: a
    /// rejecting status takes the slot back, the re-send reuses the seqid.
    #[test]
    fn typed_calls_keep_the_slot_table() {
        let (addr, server) = fake(|mut r, mut w| {
            for status in ["NFS4ERR_DELAY", "NFS4_OK", "NFS4_OK"] {
                let req = recv_line(&mut r);
                send(
                    &mut w,
                    json!({"xid": req["xid"], "status": status, "seqid": req["seq"]["seqid"],
                           "stateid": {"other": req["op"], "seqid": 1}}),
                );
            }
            wait_close(&mut r);
        });
        let c = Client::connect(addr).expect("connect");
        c.set_timeout(Duration::from_secs(10));
        let s = Session::new(Arc::new(c), "s", 2);
        let a = OpenArgs::new("o", "f");
        let o = s.open_outcome(1, &a).expect("reply");
        assert!(o.rejects_seq() && o.clone().require_ok().is_err());
        assert_eq!(s.last_seqids(), vec![0, 0]);
        let o = s
            .open_outcome(1, &a)
            .expect("reply")
            .require_ok()
            .expect("ok");
        assert_eq!(o.reply().get("seqid"), Some(&json!(1)));
        let sid = o.stateid().cloned().expect("stateid");
        assert_eq!(sid.other, "OPEN");
        let o = s.close_outcome(1, &sid).expect("reply");
        assert_eq!(o.reply().get("seqid"), Some(&json!(2)));
        assert_eq!(o.stateid().map(|s| s.other.as_str()), Some("CLOSE"));
        assert_eq!(s.last_seqids(), vec![0, 2]);
        drop(s);
        server.join().expect("fake server");
    }
}
