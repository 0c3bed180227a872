//! The frontend↔filterd frame decoders, JSON, binary and compact (issue
//! 16; a leading 0xc1 reaches the compact decoder): any bytes give a frame
//! or an error, never a panic; a frame that decodes encodes (in every
//! encoding) and decodes again to the same frame.
#![no_main]

use libfilter::proto::{self, Encoding};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::decode_hello(data);
    if let Ok(f) = proto::decode_request(data) {
        for enc in [
            Encoding::Json,
            Encoding::Binary,
            Encoding::Compact,
            Encoding::CompactRecords,
        ] {
            // JSON is larger: a frame near the size limit may not fit it.
            let Ok(bytes) = proto::encode_request(enc, &f) else {
                continue;
            };
            let again = proto::decode_request(&bytes).expect("an encoded request decodes");
            assert_eq!(f, again);
        }
    }
    if let Ok(f) = proto::decode_server(data) {
        for enc in [
            Encoding::Json,
            Encoding::Binary,
            Encoding::Compact,
            Encoding::CompactRecords,
        ] {
            let Ok(bytes) = proto::encode_server(enc, &f) else {
                continue;
            };
            let again = proto::decode_server(&bytes).expect("an encoded server frame decodes");
            assert_eq!(f, again);
        }
    }
});
