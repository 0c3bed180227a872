//! rksmbd — an SMB 2.1 / 3.0 / 3.0.2 / 3.1.1 server frontend of rkfilter
//! for one share, for real SMB clients (smbclient, smbprotocol, Windows).
//!
//! Like the shims it keeps nothing durable of its own: every file open is
//! a filterd handle through libfilter. Modules, from the wire up:
//!
//! - [`wire`]: the bounded SMB2 codec (reader, writer, header, statuses).
//! - [`crypto`]: signing (HMAC-SHA256, AES-CMAC, AES-GMAC), the SP800-108
//!   KDF and the 3.1.1 preauth integrity hash.
//! - [`spnego`] and [`ntlm`]: authentication — SPNEGO-wrapped NTLMSSP,
//!   NTLMv2 checked against the NT hashes of [`users`] (smbpasswd format);
//!   [`logons`] how fast failed logons may be retried.
//! - [`server`]: connections, compounding, signing, NEGOTIATE,
//!   SESSION_SETUP, TREE_CONNECT, IOCTL and the other non-file commands;
//!   [`credits`] the credits and message ids a connection allows.
//! - [`files`] and [`create`]: CREATE, CLOSE, READ, WRITE, FLUSH, QUERY_INFO, SET_INFO,
//!   QUERY_DIRECTORY over filterd handles, durable and persistent handles
//!   and leases; [`contexts`] decodes and encodes CREATE contexts, [`info`]
//!   the MS-FSCC information classes, [`times`] the times SET_INFO sets
//!   (and those an open froze), [`lock`] byte-range locks, [`notify`]
//!   CHANGE_NOTIFY; [`breaks`] forwards filterd's lease
//!   breaks to the clients and their acknowledgments back, [`breaking`]
//!   knows which are in progress.
//!
//! [`sessions`] holds what crosses connections: PreviousSessionId and
//! AppInstanceId; [`made`] how a durable open was made (granted access,
//! write-through), kept with its filterd handle; [`channels`] multichannel (a session bound to several
//! connections, served by the thread of the one that set it up);
//! [`settle`] closes again the handles whose close filterd never answered.
//!
//! docs/smb3.md says what is implemented and what is not.
#![forbid(unsafe_code)]

pub mod breaking;
pub mod breaks;
pub mod channels;
pub mod contexts;
pub mod copychunk;
pub mod create;
pub mod credits;
pub mod crypto;
pub mod dirshare;
pub mod files;
pub mod info;
pub mod lock;
pub mod logons;
pub mod made;
pub mod notify;
pub mod ntlm;
pub mod server;
pub mod sessions;
pub mod settle;
pub mod spnego;
pub mod times;
pub mod unanswered;
pub mod users;
pub mod wire;
