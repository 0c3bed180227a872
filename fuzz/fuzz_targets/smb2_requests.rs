//! What an SMB client sends to rksmbd, through rksmbd's own request
//! handling (rksmbd::server::Harness, against a live filterd): the
//! Direct TCP framing, the compound chain, every header and command body,
//! CREATE contexts, SPNEGO and NTLMSSP. An input is the byte stream of
//! one connection (4-byte transport headers and PDUs, as captured from
//! smbclient and smbprotocol). One that starts with a NEGOTIATE is served
//! from the start, as is; any other first negotiates and logs on, and
//! gets its session and tree ids pointed at that session (related ones,
//! all ones, are left) and its message ids at the credits granted, so the
//! command bodies behind the session and message id checks are reached. Never a panic; and a PDU answered is answered with
//! well-formed SMB2 responses.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rksmbd::server::{Config, Harness};
use rksmbd::wire::{self, Header, HEADER_LEN};

#[path = "live_filterd.rs"]
mod live_filterd;

static LIVE: OnceLock<Harness> = OnceLock::new();

/// A 3.1.1 NEGOTIATE (with the SHA-512 preauth context it needs), framed.
fn negotiate() -> Vec<u8> {
    let mut m = vec![0xFE, b'S', b'M', b'B', 64, 0, 1, 0, 0, 0, 0, 0];
    m.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]); // command, 512 credits, flags
    m.extend_from_slice(&[0; 8 + 4 + 4 + 8 + 16]); // message id .. signature
    m.extend_from_slice(&[36, 0, 1, 0, 1, 0, 0, 0]); // size, 1 dialect, signing
    m.extend_from_slice(&[0; 4 + 16]); // capabilities, client guid
    m.extend_from_slice(&104u32.to_le_bytes()); // context offset
    m.extend_from_slice(&[1, 0, 0, 0]); // one context
    m.extend_from_slice(&[0x11, 0x03, 0, 0]); // 3.1.1, padded to 8
    m.extend_from_slice(&[1, 0, 6, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0]);
    let mut f = u32::try_from(m.len()).unwrap_or(0).to_be_bytes().to_vec();
    f.extend_from_slice(&m);
    f
}

/// Points every message of every frame of `stream` at `session` and
/// `tree` (but those a related message leaves to the one before), and
/// gives each but a CANCEL the next message ids, as many as its credit
/// charge (the NEGOTIATE used 0 and was granted 512).
fn retarget(stream: &mut [u8], session: u64, tree: u32) {
    let mut mid = 1u64;
    let mut at = 0usize;
    while let Some(head) = stream.get(at..at + 4) {
        let n = usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]);
        let Some(pdu) = stream.get_mut(at + 4..at + 4 + n) else {
            return;
        };
        let mut m = 0usize;
        while let Some(msg) = pdu.get_mut(m..m + HEADER_LEN) {
            if msg[..4] != wire::PROTOCOL_ID {
                break;
            }
            let flags = u32::from_le_bytes([msg[16], msg[17], msg[18], msg[19]]);
            if msg[40..48] != [0xFF; 8] {
                msg[40..48].copy_from_slice(&session.to_le_bytes());
            }
            if flags & wire::FLAG_ASYNC == 0 && msg[36..40] != [0xFF; 4] {
                msg[36..40].copy_from_slice(&tree.to_le_bytes());
            }
            if wire::Command::from_code(u16::from_le_bytes([msg[12], msg[13]])) != wire::Command::Cancel {
                msg[24..32].copy_from_slice(&mid.to_le_bytes());
                mid += u64::from(u16::from_le_bytes([msg[6], msg[7]]).max(1));
            }
            let next = u32::from_le_bytes([msg[20], msg[21], msg[22], msg[23]]);
            match usize::try_from(next) {
                Ok(0) | Err(_) => break,
                Ok(next) => m += next,
            }
        }
        at += 4 + n;
    }
}

fuzz_target!(|data: &[u8]| {
    let h = LIVE.get_or_init(|| {
        let sock = live_filterd::start("smb2");
        let users =
            rksmbd::users::Users::parse(&rksmbd::users::line("fuzz", 0, "secret")).expect("users");
        let config = Config {
            share: "share".into(),
            users,
            server_name: "rksmbd".into(),
            logon_timeout: rksmbd::server::LOGON_TIMEOUT,
            logon_queue: rksmbd::logons::MAX_QUEUE,
        };
        Harness::attach(&sock, "smb2-fuzz", config).expect("attach")
    });
    let mut c = h.connection();
    let starts_negotiating = data
        .get(4..4 + HEADER_LEN)
        .and_then(|m| Header::decode(m).ok())
        .is_some_and(|hdr| hdr.command == 0);
    let mut stream = data.to_vec();
    if !starts_negotiating {
        let answered = c.frames(&negotiate());
        let ok = |r: &[u8]| r.get(8..12) == Some(&[0; 4][..]);
        assert!(
            matches!(answered.as_slice(), [Ok(r)] if ok(r)),
            "{answered:?}"
        );
        let (session, tree) = c.log_on("fuzz");
        retarget(&mut stream, session, tree);
    }
    for answer in c.frames(&stream) {
        let Ok(pdu) = answer else { break };
        if pdu.is_empty() {
            continue; // a CANCEL alone
        }
        // Well-formed responses: a chain of response headers.
        let chain = wire::compound(&pdu).expect("a response chain");
        for (hdr, _) in chain {
            assert!(hdr.flags & wire::FLAG_RESPONSE != 0, "{hdr:?}");
        }
    }
});
