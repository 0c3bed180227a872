//! Values the crates' tests build (feature `test-util`, for
//! dev-dependencies; always in libfilter's own tests).

use crate::model::*;

/// A persistent handle record of `path` (file 1:2, a made-up kernel
/// handle, read access, sharing all), unlocked, delete on close unset.
pub fn persistent_record(path: &str) -> HandleRecord {
    HandleRecord {
        key: ResumeKey::new_random(),
        protocol: Protocol::new("smb").expect("a protocol name"),
        frontend: InstanceName::new("smb1").expect("an instance name"),
        client: ClientId::new("c").expect("a client id"),
        create_guid: Some(CreateGuid(uuid::Uuid::new_v4())),
        owner: None,
        path: RelPath::new(path).expect("a relative path"),
        file: FileId { dev: 1, ino: 2 },
        kernel_handle: Some(KernelHandle {
            handle_type: 1,
            bytes: vec![1, 2, 3],
        }),
        access: Access::new(Rights::READ).expect("read access"),
        share: Rights::ALL,
        durability: Durability::Persistent { timeout_ms: 1000 },
        conn: ConnState::Connected,
        create_action: CreateAction::Created,
        opened_ms: 5,
        locks: Vec::new(),
        lock_sequence: Vec::new(),
        lease: None,
        delete_on_close: false,
        share_group: None,
        lock_owner: None,
        stat: false,
        share_exempt: false,
        through_link: false,
    }
}
