//! rksmbd's authentication decoders on a client's security blob:
//! SPNEGO (NegTokenInit, NegTokenResp or raw NTLMSSP), then the NTLMSSP
//! NEGOTIATE and AUTHENTICATE messages it carries, checked against a
//! users file — a typed error or a logon, never a panic; and never a
//! logon, as the fuzzer cannot know the password's hash.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rksmbd::ntlm;
use rksmbd::spnego;
use rksmbd::users::{line, Users};

struct Fixed {
    users: Users,
    pending: ntlm::Pending,
}

static FIXED: OnceLock<Fixed> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let f = FIXED.get_or_init(|| {
        let mut neg = ntlm::SIGNATURE.to_vec();
        neg.extend_from_slice(&[1, 0, 0, 0, 0x97, 0x82, 0x08, 0xE2]);
        neg.extend_from_slice(&[0; 16]);
        Fixed {
            users: Users::parse(&line("fuzz", 0, "secret")).expect("users"),
            pending: ntlm::challenge(&neg, "rksmbd").expect("challenge").0,
        }
    });
    let ntlm = match spnego::parse_client(data) {
        Ok(token) => token.ntlm,
        Err(_) => data.to_vec(),
    };
    let _ = ntlm::challenge(&ntlm, "rksmbd");
    assert!(ntlm::authenticate(&f.pending, &ntlm, &f.users).is_err());
});
