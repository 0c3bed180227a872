//! SMB2 message signing and key derivation (MS-SMB2 3.1.4.1, 3.1.4.2,
//! 3.3.5.5.3): HMAC-SHA256 for 2.1, AES-128-CMAC for 3.0/3.0.2 (and 3.1.1
//! when GMAC is not offered), AES-128-GMAC for 3.1.1; the SP800-108
//! counter-mode KDF over HMAC-SHA256; the 3.1.1 preauth integrity hash
//! (SHA-512).

use aes::Aes128;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::Aes128Gcm;
use cmac::Cmac;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256, Sha512};

use crate::wire::{FLAG_RESPONSE, HEADER_LEN};

/// Offset of the signature in the SMB2 header.
const SIGNATURE_AT: usize = 48;
/// Offset of the flags in the SMB2 header.
const FLAGS_AT: usize = 16;

/// SMB2 dialects rksmbd speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dialect {
    /// SMB 2.1 (0x0210).
    Smb210,
    /// SMB 3.0 (0x0300).
    Smb300,
    /// SMB 3.0.2 (0x0302).
    Smb302,
    /// SMB 3.1.1 (0x0311).
    Smb311,
}

impl Dialect {
    /// From the wire code.
    pub fn from_code(c: u16) -> Option<Dialect> {
        match c {
            0x0210 => Some(Dialect::Smb210),
            0x0300 => Some(Dialect::Smb300),
            0x0302 => Some(Dialect::Smb302),
            0x0311 => Some(Dialect::Smb311),
            _ => None,
        }
    }
    /// The wire code.
    pub fn code(self) -> u16 {
        match self {
            Dialect::Smb210 => 0x0210,
            Dialect::Smb300 => 0x0300,
            Dialect::Smb302 => 0x0302,
            Dialect::Smb311 => 0x0311,
        }
    }
    /// SMB 3.x.
    pub fn is_smb3(self) -> bool {
        self >= Dialect::Smb300
    }
}

/// A signing algorithm (MS-SMB2 2.2.3.1.7 ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlgorithm {
    /// HMAC-SHA256 (id 0).
    HmacSha256,
    /// AES-128-CMAC (id 1).
    AesCmac,
    /// AES-128-GMAC (id 2).
    AesGmac,
}

impl SigningAlgorithm {
    /// The id in SMB2_SIGNING_CAPABILITIES.
    pub fn id(self) -> u16 {
        match self {
            SigningAlgorithm::HmacSha256 => 0,
            SigningAlgorithm::AesCmac => 1,
            SigningAlgorithm::AesGmac => 2,
        }
    }

    /// The algorithm of an id, if it is one rksmbd signs with.
    pub fn from_id(id: u16) -> Option<SigningAlgorithm> {
        match id {
            0 => Some(SigningAlgorithm::HmacSha256),
            1 => Some(SigningAlgorithm::AesCmac),
            2 => Some(SigningAlgorithm::AesGmac),
            _ => None,
        }
    }

    /// The algorithm an SMB 3.1.1 connection signs with, from the ids of
    /// the client's SMB2_SIGNING_CAPABILITIES in its order: the first
    /// one rksmbd supports (MS-SMB2 3.3.5.4) — passing over AES-GMAC
    /// whenever the client offers another, since AES-GMAC's nonce is
    /// (MessageId, role) and a session key signs the answers to the
    /// first binding leg of every channel under the same nonce (MessageId
    /// 1, response; see docs/smb3.md). AES-CMAC when the client offers
    /// none rksmbd supports.
    pub fn choose(offered: &[u16]) -> SigningAlgorithm {
        let mut supported = offered.iter().filter_map(|&id| Self::from_id(id));
        let first = supported.clone().next();
        supported
            .find(|a| *a != SigningAlgorithm::AesGmac)
            .or(first)
            .unwrap_or(SigningAlgorithm::AesCmac)
    }
}

/// SP800-108 KDF in counter mode with HMAC-SHA256, one 128-bit block
/// (MS-SMB2 3.1.4.2): `HMAC(key, 1 ‖ label ‖ 0 ‖ context ‖ 128)`.
pub fn kdf(key: &[u8], label: &[u8], context: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
        return out; // HMAC takes keys of any length
    };
    mac.update(&1u32.to_be_bytes());
    mac.update(label);
    mac.update(&[0]);
    mac.update(context);
    mac.update(&128u32.to_be_bytes());
    let full = mac.finalize().into_bytes();
    out.copy_from_slice(&full[..16]);
    out
}

/// The signing key of a session (MS-SMB2 3.3.5.5.3).
pub fn signing_key(dialect: Dialect, session_key: &[u8; 16], preauth: &[u8; 64]) -> [u8; 16] {
    match dialect {
        Dialect::Smb210 => *session_key,
        Dialect::Smb300 | Dialect::Smb302 => kdf(session_key, b"SMB2AESCMAC\0", b"SmbSign\0"),
        Dialect::Smb311 => kdf(session_key, b"SMBSigningKey\0", preauth),
    }
}

/// The signature of `msg` (one SMB2 message, its signature field taken as
/// zero) under `key`.
pub fn signature(alg: SigningAlgorithm, key: &[u8; 16], msg: &[u8]) -> [u8; 16] {
    let mut zeroed = msg.to_vec();
    if let Some(s) = zeroed.get_mut(SIGNATURE_AT..SIGNATURE_AT + 16) {
        s.fill(0);
    }
    let mut out = [0u8; 16];
    match alg {
        SigningAlgorithm::HmacSha256 => {
            if let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key) {
                mac.update(&zeroed);
                out.copy_from_slice(&mac.finalize().into_bytes()[..16]);
            }
        }
        SigningAlgorithm::AesCmac => {
            if let Ok(mut mac) = <Cmac<Aes128> as Mac>::new_from_slice(key) {
                mac.update(&zeroed);
                out.copy_from_slice(&mac.finalize().into_bytes());
            }
        }
        SigningAlgorithm::AesGmac => {
            // Nonce: message id (8 bytes LE), then a u32 with bit 0 set for
            // a response and bit 1 for CANCEL.
            let mut nonce = [0u8; 12];
            if let Some(id) = zeroed.get(24..32) {
                nonce[..8].copy_from_slice(id);
            }
            let flags = zeroed
                .get(FLAGS_AT..FLAGS_AT + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0);
            let command = zeroed
                .get(12..14)
                .and_then(|b| <[u8; 2]>::try_from(b).ok())
                .map(u16::from_le_bytes)
                .unwrap_or(0);
            let mut role = 0u32;
            if flags & FLAG_RESPONSE != 0 {
                role |= 1;
            }
            if command == 0x0C {
                role |= 2;
            }
            nonce[8..].copy_from_slice(&role.to_le_bytes());
            let cipher = Aes128Gcm::new(key.into());
            let mut empty: [u8; 0] = [];
            if let Ok(tag) =
                cipher.encrypt_in_place_detached((&nonce).into(), &zeroed, &mut empty[..])
            {
                out.copy_from_slice(&tag);
            }
        }
    }
    out
}

/// Signs `msg` in place: sets the SIGNED flag and writes the signature.
pub fn sign(alg: SigningAlgorithm, key: &[u8; 16], msg: &mut [u8]) {
    if msg.len() < HEADER_LEN {
        return;
    }
    if let Some(f) = msg.get_mut(FLAGS_AT..FLAGS_AT + 4) {
        let v = u32::from_le_bytes(<[u8; 4]>::try_from(&*f).unwrap_or_default())
            | crate::wire::FLAG_SIGNED;
        f.copy_from_slice(&v.to_le_bytes());
    }
    let sig = signature(alg, key, msg);
    if let Some(s) = msg.get_mut(SIGNATURE_AT..SIGNATURE_AT + 16) {
        s.copy_from_slice(&sig);
    }
}

/// Whether `msg` carries a correct signature (constant-time compare).
pub fn verify(alg: SigningAlgorithm, key: &[u8; 16], msg: &[u8]) -> bool {
    let Some(got) = msg.get(SIGNATURE_AT..SIGNATURE_AT + 16) else {
        return false;
    };
    let want = signature(alg, key, msg);
    got.iter()
        .zip(want.iter())
        .fold(0u8, |d, (a, b)| d | (a ^ b))
        == 0
}

/// One step of the 3.1.1 preauth integrity hash: `SHA-512(prev ‖ msg)`.
pub fn preauth_update(prev: &[u8; 64], msg: &[u8]) -> [u8; 64] {
    let mut h = Sha512::new();
    h.update(prev);
    h.update(msg);
    let mut out = [0u8; 64];
    out.copy_from_slice(&h.finalize());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_detect_changes() {
        let key = [7u8; 16];
        for alg in [
            SigningAlgorithm::HmacSha256,
            SigningAlgorithm::AesCmac,
            SigningAlgorithm::AesGmac,
        ] {
            let mut msg = vec![0u8; 80];
            msg[..4].copy_from_slice(&crate::wire::PROTOCOL_ID);
            sign(alg, &key, &mut msg);
            assert!(verify(alg, &key, &msg), "{alg:?}");
            msg[70] ^= 1;
            assert!(!verify(alg, &key, &msg), "{alg:?}");
        }
        assert!(!verify(SigningAlgorithm::AesCmac, &key, &[0; 10]));
    }

    /// The client's order decides, AES-GMAC only when it is all the
    /// client offers (review rvcrypto: GMAC won wherever it stood, and a
    /// client offering only HMAC-SHA256 got AES-CMAC).
    #[test]
    fn the_signing_algorithm_is_the_clients_first_gmac_last() {
        use SigningAlgorithm::{AesCmac, AesGmac, HmacSha256};
        for (offered, want) in [
            (&[2, 1][..], AesCmac),
            (&[2, 1, 0], AesCmac),
            (&[2, 0, 1], HmacSha256),
            (&[0], HmacSha256),
            (&[0, 1], HmacSha256),
            (&[1, 0], AesCmac),
            (&[2], AesGmac),
            (&[9, 2, 7], AesGmac),
            (&[9, 0], HmacSha256),
            (&[9], AesCmac),
            (&[], AesCmac),
        ] {
            assert_eq!(SigningAlgorithm::choose(offered), want, "{offered:?}");
        }
    }

    #[test]
    fn kdf_matches_the_sp800_108_layout() {
        // Recomputed by hand: HMAC-SHA256(key, 00000001 ‖ "L" ‖ 00 ‖ "C" ‖ 00000080).
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[1; 16]).unwrap();
        mac.update(&[0, 0, 0, 1, b'L', 0, b'C', 0, 0, 0, 0x80]);
        let want = mac.finalize().into_bytes();
        assert_eq!(kdf(&[1; 16], b"L", b"C"), want[..16]);
    }
}
