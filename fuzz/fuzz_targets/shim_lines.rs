//! The smbl/1 and nfsl/1 line decoder both frontends use: any line gives a
//! request object with its id, or the reply for a malformed one (with the
//! frontend's status and a null id), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for (id, status) in [
        ("mid", "STATUS_INVALID_PARAMETER"),
        ("xid", "NFS4ERR_INVAL"),
    ] {
        match shimline::parse_request(data, id, status) {
            Ok((obj, n)) => assert_eq!(obj.get(id).and_then(|v| v.as_u64()), Some(n)),
            Err(reply) => {
                assert_eq!(reply["status"], status);
                assert!(reply[id].is_null());
            }
        }
        if let Ok((obj, _)) = shimline::parse_request(data, id, status) {
            for f in ["path", "offset", "session_id", "seq", "stateid"] {
                let _ = shimline::u64_field(&obj, f);
                let _ = shimline::str_field(&obj, f);
            }
        }
    }
});
