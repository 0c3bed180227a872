//! The LMDB record decoder: a corrupted, truncated or old-schema record gives
//! an error, never a panic.
#![no_main]

use libfilter::model::{HandleRecord, Intent, ReplayRecord};
use libfilter::store::{decode_record, parse_replay_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_record::<HandleRecord>(data);
    let _ = decode_record::<ReplayRecord>(data);
    let _ = decode_record::<Intent>(data);
    let _ = parse_replay_key(data);
});
