//! Review vU (round 10): the compact decoder (`FEATURE_COMPACT_FRAMES`,
//! kinds 1–8) on mutated frames — truncations, every byte replaced or
//! inserted, runs of 0xff (overlong varints and lengths), random edits —
//! never panics, refuses with `BadFrame`, and whatever it accepts
//! re-encodes to the same request both compact and binary v1; a valid
//! frame decodes to what binary v1 decodes for the same request.
use libfilter::lease::{LeaseKey, LeaseState};
use libfilter::model::*;
use libfilter::proto::*;

fn reqs() -> Vec<RequestFrame> {
    let rec = |scope: ReplayScope, op, reply: &str, keep| RecordSpec {
        scope,
        op_id: op,
        reply: reply.into(),
        keep,
    };
    let open = OpenRequest {
        client: ClientId::new("cl").unwrap(),
        path: RelPath::new("d/f").unwrap(),
        access: Access::new(Rights::READ.union(Rights::WRITE)).unwrap(),
        share: Rights::READ,
        disposition: Disposition::OpenIf,
        durability: Durability::Persistent { timeout_ms: 300 },
        create_guid: Some(CreateGuid(uuid::Uuid::from_u128(5))),
        owner: Some("o".into()),
        lease: Some(LeaseRequest {
            key: LeaseKey(uuid::Uuid::from_u128(9)),
            state: LeaseState::parse("RWH").unwrap(),
            epoch: 3,
        }),
        no_wait: true,
        wait_for_hints: true,
        replay_same_lease: false,
        resume_only: false,
        share_group: Some("g".into()),
        stat: true,
        share_exempt: true,
        put: vec![
            rec(
                ReplayScope::Session(ScopeName::new("sess").unwrap()),
                7,
                "{\"x\":1}",
                4,
            ),
            rec(
                ReplayScope::Handle(ResumeKey(uuid::Uuid::from_u128(1))),
                u64::MAX,
                "",
                u32::MAX,
            ),
        ],
    };
    let mut replay = open.clone();
    replay.put.truncate(1);
    vec![
        RequestFrame {
            id: 300,
            req: Request::Open(open),
        },
        RequestFrame {
            id: u64::MAX,
            req: Request::ReplayOpen(replay),
        },
        RequestFrame {
            id: 1,
            req: Request::Close {
                key: ResumeKey(uuid::Uuid::from_u128(2)),
                put: vec![rec(
                    ReplayScope::Session(ScopeName::new("s").unwrap()),
                    1,
                    "é",
                    1,
                )],
                delete: vec![
                    (ReplayScope::Session(ScopeName::new("s").unwrap()), 0),
                    (
                        ReplayScope::Handle(ResumeKey(uuid::Uuid::from_u128(3))),
                        200,
                    ),
                ],
                delete_on_close: None,
            },
        },
    ]
}

#[test]
fn vu_differential_and_mutations() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut ok, mut bad) = (0u64, 0u64);
    for f in reqs() {
        let c = encode_request(Encoding::CompactRecords, &f).unwrap();
        assert_eq!(c[0], 0xc1);
        let b = encode_request(Encoding::Binary, &f).unwrap();
        let dc = decode_request(&c).unwrap();
        let db = decode_request(&b).unwrap();
        assert_eq!(dc, db);
        assert_eq!(dc, f);
        let mut check = |m: &[u8]| match std::panic::catch_unwind(|| decode_request(m)) {
            Err(_) => panic!("panic on {m:x?}"),
            Ok(Ok(g)) => {
                ok += 1;
                // Whatever it accepts re-encodes to what it decoded, both ways.
                let again = encode_request(Encoding::CompactRecords, &g).unwrap();
                assert_eq!(decode_request(&again).unwrap(), g, "{m:x?}");
                let bin = encode_request(Encoding::Binary, &g).unwrap();
                assert_eq!(decode_request(&bin).unwrap(), g, "{m:x?}");
            }
            Ok(Err((_, e))) => {
                bad += 1;
                assert_eq!(e.code, ErrorCode::BadFrame);
            }
        };
        for n in 0..c.len() {
            check(&c[..n]);
        }
        for i in 0..c.len() {
            for v in [0u8, 1, 2, 5, 0x7f, 0x80, 0xc1, 0xfe, 0xff] {
                let mut m = c.clone();
                m[i] = v;
                check(&m);
                let mut m = c.clone();
                m.insert(i, v);
                check(&m);
                let mut m = c.clone();
                m.splice(i..i, [0xff; 12]);
                check(&m);
            }
        }
        for _ in 0..20_000 {
            let mut m = c.clone();
            for _ in 0..(rnd() % 4 + 1) {
                let r = rnd();
                let [b0, b1, _, _, _, byte, ..] = r.to_le_bytes();
                let i = usize::from(u16::from_le_bytes([b0, b1])) % m.len().max(1);
                match (r >> 32) % 3 {
                    0 => {
                        if let Some(x) = m.get_mut(i) {
                            *x = byte;
                        }
                    }
                    1 => m.insert(i.min(m.len()), byte),
                    _ => {
                        if i < m.len() && m.len() > 2 {
                            m.remove(i);
                        }
                    }
                }
            }
            check(&m);
        }
    }
    eprintln!("VU compact fuzz: accepted {ok}, refused {bad}");
}
