//! The frontend↔filterd frame decoders: any bytes give a frame or an
//! error, never a panic; a frame that decodes encodes and decodes again to
//! the same frame.
#![no_main]

use libfilter::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::decode_hello(data);
    if let Ok(f) = proto::decode_request(data) {
        let bytes = proto::encode(&f).expect("a decoded request encodes");
        let again = proto::decode_request(&bytes).expect("an encoded request decodes");
        assert_eq!(f, again);
    }
    if let Ok(f) = proto::decode_server(data) {
        let bytes = proto::encode(&f).expect("a decoded server frame encodes");
        let again = proto::decode_server(&bytes).expect("an encoded server frame decodes");
        assert_eq!(f, again);
    }
});
