//! OPEN and CLOSE decoded into typed fields borrowed from the line (issue
//! #16): the two requests of the nfsl/1 OPEN+CLOSE pair skip the
//! `serde_json::Value` map (a `String` per key, a tree of nodes, its drop).
//! Anything this does not take — another op, a missing or mistyped field, a
//! duplicate key, a field it does not know, a line that is not JSON — goes the `Value` way
//! ([`super::handle_line`]), so its errors read exactly as before; what it
//! takes, it checks in the same order and with the same words as the
//! `Value` way ([`super::Fields`]), so a request reads the same either way
//! (`typed_and_value_requests_answer_alike`).

use std::borrow::Cow;

use serde::Deserialize;

use super::{inval, Fail, SeqArgs};

/// A string field, borrowed unless it has escapes.
#[derive(Deserialize)]
pub(super) struct Str<'a>(#[serde(borrow)] pub Cow<'a, str>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SeqLine<'a> {
    #[serde(borrow)]
    sessionid: Str<'a>,
    slot: u64,
    seqid: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StateidLine<'a> {
    #[serde(borrow)]
    pub other: Str<'a>,
    pub seqid: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateLine<'a> {
    #[serde(borrow)]
    pub mode: Str<'a>,
    #[serde(borrow, default)]
    pub verifier: Option<Str<'a>>,
}

/// An OPEN or CLOSE line: the fields either reads (`null` reads as absent,
/// as the `Value` way reads it for the optional ones).
///
/// No field is skipped (`deny_unknown_fields` here and in the nested
/// structs; a line with another field goes the `Value` way): serde skips a
/// value without checking it as a `Value` parse does — a lone surrogate or
/// bad UTF-8 in a string, a number past f64's range, nesting past 128 —
/// so a line the `Value` way refused as not JSON (NFS4ERR_INVAL) was run,
/// its file opened or created (review vS;
/// `lines_with_what_a_value_parse_refuses_are_not_run`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Line<'a> {
    pub xid: u64,
    #[serde(borrow)]
    pub op: Str<'a>,
    #[serde(borrow)]
    seq: SeqLine<'a>,
    #[serde(borrow, default)]
    pub owner: Option<Str<'a>>,
    #[serde(borrow, default)]
    pub path: Option<Str<'a>>,
    #[serde(borrow, default)]
    pub access: Option<Str<'a>>,
    #[serde(borrow, default)]
    pub deny: Option<Str<'a>>,
    #[serde(default)]
    pub truncate: Option<bool>,
    #[serde(borrow, default)]
    pub create: Option<CreateLine<'a>>,
    #[serde(borrow, default)]
    pub want_delegation: Option<Str<'a>>,
    #[serde(borrow, default)]
    pub stateid: Option<StateidLine<'a>>,
}

/// What the typed way runs.
pub(super) enum Op {
    Open,
    Close,
}

impl<'a> Line<'a> {
    /// The line, if it is an OPEN or CLOSE the typed way runs: `None`
    /// sends it the `Value` way (which then reports what is wrong).
    pub(super) fn decode(line: &'a [u8]) -> Option<(Line<'a>, Op)> {
        let l: Line<'a> = serde_json::from_slice(line).ok()?;
        let op = match &*l.op.0 {
            // The required fields present as strings (`null` or absent:
            // the `Value` way words the error).
            "OPEN" if l.owner.is_some() && l.path.is_some() && l.access.is_some() => Op::Open,
            "CLOSE" if l.stateid.is_some() => Op::Close,
            _ => return None,
        };
        Some((l, op))
    }

    /// The slot, as `parse_seq` reads it.
    pub(super) fn seq(&self) -> Result<SeqArgs, Fail> {
        Ok(SeqArgs {
            sessionid: self.seq.sessionid.0.clone().into_owned(),
            slot: usize::try_from(self.seq.slot).map_err(|_| inval("slot too large"))?,
            seqid: self.seq.seqid,
        })
    }
}

fn text<'s>(s: &'s Option<Str<'_>>) -> Option<&'s str> {
    s.as_ref().map(|s| &*s.0)
}

impl super::Fields for Line<'_> {
    fn str(&self, name: &str) -> Result<&str, Fail> {
        match name {
            "owner" => text(&self.owner),
            "path" => text(&self.path),
            "access" => text(&self.access),
            _ => None,
        }
        .ok_or_else(|| inval(format!("missing field {name}")))
    }
    fn opt_str(&self, name: &str) -> Result<Option<&str>, Fail> {
        Ok(match name {
            "deny" => text(&self.deny),
            "want_delegation" => text(&self.want_delegation),
            _ => None,
        })
    }
    fn truncate(&self) -> Result<Option<bool>, Fail> {
        Ok(self.truncate)
    }
    fn create(&self) -> Result<Option<(&str, Option<&str>)>, Fail> {
        Ok(self
            .create
            .as_ref()
            .map(|c| (&*c.mode.0, c.verifier.as_ref().map(|v| &*v.0))))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value};

    use super::super::{open_fields, parse_seq, Fail, OpenFields};
    use super::{Line, Op};

    fn shown(r: Result<OpenFields, Fail>) -> String {
        match r {
            Ok(f) => format!(
                "{} {:?} {} {} {:?} {:?} {} {:?} {} {:?}",
                f.owner,
                f.path,
                f.access_w,
                f.deny_w,
                f.access,
                f.share,
                f.truncate,
                f.create,
                f.want,
                f.lease_state
            ),
            Err(Fail(s, m)) => format!("{s}: {m}"),
        }
    }

    fn map(line: &str) -> Map<String, Value> {
        match serde_json::from_str(line) {
            Ok(Value::Object(m)) => m,
            other => panic!("{line}: {other:?}"),
        }
    }

    const SEQ: &str = r#""seq":{"seqid":7,"sessionid":"S\u00e9\"x","slot":3},"xid":9"#;

    /// Every OPEN the typed way takes reads as the `Value` way reads it:
    /// the same fields, or the same error, in the same order.
    #[test]
    fn typed_and_value_opens_read_alike() {
        let opens = [
            r#""access":"both","create":{"mode":"unchecked"},"deny":"none","owner":"o","path":"a""#,
            r#""access":"read","owner":"\u00fcn\u00efc\u00f6d\u00e9 \ud83d\ude00","path":"d/\u00e9t\u00e9\n.txt""#,
            r#""access":"write","owner":"o\"q\\","path":"名前/ファイル","deny":null,"truncate":null,"create":null,"want_delegation":null"#,
            r#""access":"read","owner":"o","path":"a","deny":"both","truncate":true,"want_delegation":"write""#,
            r#""access":"both","owner":"o","path":"a","deny":"both","truncate":true,"want_delegation":"write""#,
            r#""access":"read","owner":"o","path":"a","create":{"mode":"exclusive","verifier":"ABCdef0123456789"}"#,
            r#""access":"read","owner":"o","path":"a","create":{"mode":"exclusive","verifier":"zz"}"#,
            r#""access":"read","owner":"o","path":"a","create":{"mode":"exclusive","verifier":null}"#,
            r#""access":"read","owner":"o","path":"a","create":{"mode":"exclusive"}"#,
            r#""access":"read","owner":"o","path":"a","create":{"mode":"sideways"}"#,
            r#""access":"most","owner":"o","path":"../up","deny":"all""#,
            r#""access":"most","owner":"o","path":"a","deny":"all""#,
            r#""access":"read","owner":"o","path":"a","deny":"all","want_delegation":"x""#,
            r#""access":"read","owner":"o","path":"/abs""#,
            r#""access":"read","owner":"o","path":"""#,
        ];
        for body in opens {
            let line = format!(r#"{{"op":"OPEN",{body},{SEQ}}}"#);
            let Some((l, Op::Open)) = Line::decode(line.as_bytes()) else {
                panic!("not typed: {line}");
            };
            let m = map(&line);
            assert_eq!(shown(open_fields(&l)), shown(open_fields(&m)), "{line}");
            let (a, b) = (l.seq(), parse_seq(&m));
            let (Ok(a), Ok(b)) = (a, b) else {
                panic!("seq of {line}");
            };
            assert_eq!(
                (a.sessionid, a.slot, a.seqid),
                (b.sessionid, b.slot, b.seqid)
            );
            assert_eq!(l.xid, 9);
        }
    }

    /// What the typed way does not take goes the `Value` way, which words
    /// the error (or runs the op) as before.
    #[test]
    fn mistyped_or_other_lines_go_the_value_way() {
        let others = [
            r#"{"op":"OPEN","access":"read","path":"a",SEQ}"#,
            r#"{"op":"OPEN","access":"read","owner":null,"path":"a",SEQ}"#,
            r#"{"op":"OPEN","access":"read","owner":"o","path":"a","truncate":1,SEQ}"#,
            r#"{"op":"OPEN","access":"read","owner":"o","path":"a","deny":5,SEQ}"#,
            r#"{"op":"OPEN","access":"read","owner":"o","path":"a","create":"x",SEQ}"#,
            r#"{"op":"OPEN","access":"read","owner":"o","path":"a","owner":"p",SEQ}"#,
            r#"{"op":"OPEN","access":"read","owner":"o","path":"a","seq":{"slot":0,"seqid":1},"xid":1}"#,
            r#"{"op":"OPEN","access":"read","owner":"o","path":"a","seq":{"sessionid":"s","slot":-1,"seqid":1},"xid":1}"#,
            r#"{"op":"OPEN","access":"read","owner":"o","path":"a",SEQ} x"#,
            r#"{"op":"CLOSE",SEQ}"#,
            r#"{"op":"CLOSE","stateid":{"other":"O1","seqid":"1"},SEQ}"#,
            r#"{"op":"CLOSE","stateid":{"other":"O1","seqid":4294967296e0},SEQ}"#,
            r#"{"op":"CLOSE","stateid":"O1",SEQ}"#,
            r#"{"op":"WRITE","stateid":{"other":"O1","seqid":1},SEQ}"#,
            r#"{"op":"OPEN","access":"read","owner":"o","path":"a","seq":{"sessionid":"s","slot":0,"seqid":1},"xid":-1}"#,
            r#"["OPEN"]"#,
            r#"{"op":"OPEN","access":"read","owner":"o","path":"a","want_delegation":"x","extra":[1,{"y":2}],SEQ}"#,
        ];
        for line in others {
            let line = line.replace("SEQ", SEQ);
            assert!(Line::decode(line.as_bytes()).is_none(), "typed: {line}");
        }
        let close =
            format!(r#"{{"op":"CLOSE","stateid":{{"other":"O\u0031","seqid":4294967296}},{SEQ}}}"#);
        let Some((l, Op::Close)) = Line::decode(close.as_bytes()) else {
            panic!("not typed: {close}");
        };
        let s = l.stateid.as_ref().map(|s| (&*s.other.0, s.seqid));
        assert_eq!(s, Some(("O1", 4_294_967_296)));
    }
}

/// Review vS: what serde skips it does not check, so a line with a lone
/// surrogate, a number past f64's range or nesting past 128 in a field the
/// typed way skipped was run, where the `Value` way refuses it as not JSON.
/// The typed way skips nothing: such lines go the `Value` way.
#[cfg(test)]
#[test]
fn lines_with_what_a_value_parse_refuses_are_not_run() {
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let seq = r#"{"seqid":1,"sessionid":"s","slot":0}"#;
    let open = r#""op":"OPEN","access":"read","owner":"o","path":"a","xid":1"#;
    let close = r#""op":"CLOSE","stateid":{"other":"O1","seqid":1},"xid":1"#;
    let bad = [r#""\ud800""#, "1e400", deep.as_str(), r#""\udc00x""#];
    for b in bad {
        let lines = [
            format!(r#"{{{open},"seq":{seq},"extra":{b}}}"#),
            format!(r#"{{{close},"seq":{seq},"extra":{b}}}"#),
            format!(r#"{{{open},"seq":{{"seqid":1,"sessionid":"s","slot":0,"x":{b}}}}}"#),
            format!(r#"{{{open},"seq":{seq},"create":{{"mode":"unchecked","x":{b}}}}}"#),
            format!(
                r#"{{"op":"CLOSE","stateid":{{"other":"O1","seqid":1,"x":{b}}},"xid":1,"seq":{seq}}}"#
            ),
        ];
        for line in lines {
            assert!(
                serde_json::from_str::<serde_json::Value>(&line).is_err(),
                "{line}"
            );
            assert!(Line::decode(line.as_bytes()).is_none(), "typed: {line}");
        }
    }
    let mut utf8 = format!(r#"{{{open},"seq":{seq},"extra":"x"}}"#).into_bytes();
    if let Some(x) = utf8.iter().rposition(|&c| c == b'x') {
        utf8[x] = 0xff;
    }
    assert!(serde_json::from_slice::<serde_json::Value>(&utf8).is_err());
    assert!(Line::decode(&utf8).is_none());
}

/// A reply kept on a slot and written with the request's `xid`
/// (`Answer::Shared`) is byte for byte the map with `xid` inserted, as the
/// `Value` way wrote it.
#[cfg(test)]
#[test]
fn shared_replies_write_as_the_map_would() {
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::Answer;
    let replies = [
        json!({"status": "NFS4_OK"}),
        json!({}),
        json!({"created": true, "delegation": null, "size": 0,
               "stateid": {"other": "O0123456789abcdef", "seqid": 1}, "status": "NFS4_OK"}),
        json!({"created": false, "delegation": {"stateid": {"other": "D\u{e9}", "seqid": 1}, "type": "write"},
               "size": 18446744073709551615u64, "stateid": {"other": "O\"q\\\n", "seqid": 4294967295u32},
               "status": "NFS4_OK"}),
        json!({"error": "no file d/\u{e9}t\u{e9}\n.txt \u{1f600} \"x\"", "status": "NFS4ERR_NOENT"}),
        json!({"denied": {"offset": 0, "length": 1}, "error": "a conflicting lock is held", "status": "NFS4ERR_DENIED"}),
        json!({"status": "NFS4_OK", "xid": 3, "zz": [1, "y"]}),
        json!({"status": "NFS4_OK", "xi": 1, "xida": 2}),
        json!("not an object"),
    ];
    for r in replies {
        let mut want = r.clone();
        if let Value::Object(m) = &mut want {
            m.insert("xid".into(), json!(77));
        }
        let got = Answer::Shared(Arc::new(r), 77);
        assert_eq!(
            serde_json::to_string(&got).ok(),
            serde_json::to_string(&want).ok()
        );
        let whole = Answer::Whole(want.clone());
        assert_eq!(
            serde_json::to_string(&whole).ok(),
            serde_json::to_string(&want).ok()
        );
    }
}
