//! The default `uid` of a workload: a name-based UUID (version 5, RFC 9562) of its `name`, so
//! the same name gives the same uid on every run and every machine, and anyone can compute it:
//!
//! ```text
//! python3 -c 'import uuid; ns = uuid.uuid5(uuid.NAMESPACE_URL, "zbridge:workloads-file:uid");
//!             print(uuid.uuid5(ns, "demo/productpage"))'
//! ```
//!
//! Version 5 hashes with SHA-1; the uid is an identifier, not a secret, so SHA-1's weakness
//! against chosen collisions does not matter here (and a duplicate uid is refused anyway).

/// The namespace of the derived uids: `uuid5(NAMESPACE_URL, "zbridge:workloads-file:uid")`.
const UID_NAMESPACE: [u8; 16] = [
    0x72, 0xbb, 0xe7, 0x0e, 0x5f, 0x56, 0x55, 0x29, 0x92, 0xf4, 0xb4, 0xec, 0x06, 0xab, 0x79, 0x0d,
];

/// The uid a workload gets when the file gives none: `uuid5(UID_NAMESPACE, name)`, lowercase
/// hex with hyphens, as Kubernetes writes pod UIDs.
pub fn derived_uid(name: &str) -> String {
    uuid5(&UID_NAMESPACE, name.as_bytes())
}

/// A version 5 UUID: the first 16 bytes of SHA-1(namespace ‖ name), with the version and
/// variant bits set.
fn uuid5(namespace: &[u8; 16], name: &[u8]) -> String {
    let mut input = Vec::with_capacity(16 + name.len());
    input.extend_from_slice(namespace);
    input.extend_from_slice(name);
    let digest = sha1(&input);
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// SHA-1 (FIPS 180-4). Written out here because the resolver has no hashing dependency and
/// this is its only use.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xefcd_ab89,
        0x98ba_dcfe,
        0x1032_5476,
        0xc3d2_e1f0,
    ];
    let mut message = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bit_len.to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5a82_7999),
                20..=39 => (b ^ c ^ d, 0x6ed9_eba1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8f1b_bcdc),
                _ => (b ^ c ^ d, 0xca62_c1d6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9562's DNS namespace, for the test vector Python's `uuid` module also gives.
    const NAMESPACE_DNS: [u8; 16] = [
        0x6b, 0xa7, 0xb8, 0x10, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30,
        0xc8,
    ];

    #[test]
    fn sha1_known_answers() {
        let hex = |d: [u8; 20]| d.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(hex(sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            hex(sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
    }

    #[test]
    fn uuid5_matches_other_implementations() {
        // uuid.uuid5(uuid.NAMESPACE_DNS, "python.org") in Python.
        assert_eq!(
            uuid5(&NAMESPACE_DNS, b"python.org"),
            "886313e1-3b8a-5372-9b90-0c9aee199e5d"
        );
        // The documented derivation, computed with Python as in the module comment.
        assert_eq!(
            derived_uid("demo/productpage"),
            "d99a9bd5-b48d-5363-85b1-010215b844a7"
        );
    }
}
