//! The long-term credential checks of a request (RFC 8489 §9.2.4): who it claims to be
//! (USERNAME or USERHASH), which password algorithm it uses and whether that choice survived
//! unaltered (the bid-down prevention of §9.2.1), and which integrity attribute it is checked
//! with. The nonce is checked by the server in between, with [`crate::auth::NonceKey`].

use rtc_stun::attributes::{
    ATTR_NONCE, ATTR_PASSWORD_ALGORITHM, ATTR_PASSWORD_ALGORITHMS, ATTR_REALM, ATTR_USER_HASH,
    ATTR_USERNAME,
};

use crate::auth::{
    CredentialError, Credentials, Integrity, PasswordAlgorithm, SecurityFeatures, SigningKey,
};
use crate::stun::Parsed;

/// PASSWORD-ALGORITHMS as this server sends it in every 401 and 438 (RFC 8489 §14.11): the
/// algorithms of [`PasswordAlgorithm::OFFERED`], each without parameters.
pub(crate) const PASSWORD_ALGORITHMS: [u8; 4 * PasswordAlgorithm::OFFERED.len()] = {
    let mut out = [0u8; 4 * PasswordAlgorithm::OFFERED.len()];
    let mut i = 0;
    while i < PasswordAlgorithm::OFFERED.len() {
        let [hi, lo] = PasswordAlgorithm::OFFERED[i].number().to_be_bytes();
        out[4 * i] = hi;
        out[4 * i + 1] = lo;
        i += 1;
    }
    out
};

/// A request authenticated with long-term credentials (RFC 8489 §9.2.4).
#[derive(Debug)]
pub(crate) struct Auth {
    /// The username, also when the request named it by USERHASH.
    pub(crate) username: String,
    /// What responses to the request are signed with.
    pub(crate) key: SigningKey,
}

/// How a request names its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum User<'a> {
    /// USERNAME (RFC 8489 §14.3).
    Name(&'a [u8]),
    /// USERHASH (RFC 8489 §14.4).
    Hash(&'a [u8; 32]),
}

/// The well-formed long-term credentials of a request, not yet checked against a nonce or a
/// key.
#[derive(Debug)]
pub(crate) struct Offer<'a> {
    pub(crate) user: User<'a>,
    pub(crate) realm: &'a [u8],
    pub(crate) nonce: &'a [u8],
    /// PASSWORD-ALGORITHM, MD5 when the request names none (RFC 8489 §9.2.4).
    pub(crate) algorithm: PasswordAlgorithm,
    integrity: Integrity,
    /// The bytes the integrity attribute covers, the header length for it, and its value.
    signed: (&'a [u8], u16, &'a [u8]),
}

/// Why the credentials of a request are malformed; answered with 400 (RFC 8489 §9.2.4),
/// without integrity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Malformed {
    /// A MESSAGE-INTEGRITY other than 20 bytes, or a MESSAGE-INTEGRITY-SHA256 shorter than 16
    /// bytes, longer than 32 or not a multiple of 4 (RFC 8489 §14.5, §14.6).
    #[error("message integrity of a wrong length")]
    IntegrityLength,
    /// Integrity without USERNAME or USERHASH, REALM or NONCE.
    #[error("USERNAME or USERHASH, REALM or NONCE missing")]
    Missing,
    /// Both USERNAME and USERHASH: which user is meant is not clear.
    #[error("both USERNAME and USERHASH")]
    UsernameAndUserhash,
    /// A USERHASH other than 32 bytes (RFC 8489 §14.4).
    #[error("USERHASH of a wrong length")]
    UserhashLength,
    /// Under a nonce with the "Password algorithms" feature, PASSWORD-ALGORITHM without
    /// PASSWORD-ALGORITHMS or the reverse (RFC 8489 §9.2.4 check 1).
    #[error("PASSWORD-ALGORITHM and PASSWORD-ALGORITHMS not both present")]
    AlgorithmsIncomplete,
    /// PASSWORD-ALGORITHMS differs from what the server sent with the nonce: a bid-down
    /// attempt (RFC 8489 §9.2.1, §9.2.4 check 2).
    #[error("PASSWORD-ALGORITHMS altered")]
    AlgorithmsAltered,
    /// PASSWORD-ALGORITHM names an algorithm this server does not offer, or carries
    /// parameters (RFC 8489 §9.2.4 check 3, §14.12).
    #[error("unknown PASSWORD-ALGORITHM")]
    UnknownAlgorithm,
}

impl<'a> Offer<'a> {
    /// Reads the long-term credentials of `req` in the order of RFC 8489 §9.2.4: `Ok(None)`
    /// when it carries no integrity attribute (answered with 401 and a nonce), an error when
    /// they are malformed (400).
    ///
    /// With both integrity attributes only MESSAGE-INTEGRITY-SHA256 is checked, as §9.2.4
    /// says. A USERHASH is accepted whether or not the nonce announced username anonymity.
    pub(crate) fn read(req: &'a Parsed<'_>) -> Result<Option<Self>, Malformed> {
        let Some(integrity) = req.integrity() else {
            return Ok(None);
        };
        let signed = req.signed(integrity).ok_or(Malformed::IntegrityLength)?;
        let user = match (req.attr(ATTR_USERNAME), req.attr(ATTR_USER_HASH)) {
            (Some(name), None) => User::Name(name),
            (None, Some(hash)) => {
                User::Hash(hash.try_into().map_err(|_| Malformed::UserhashLength)?)
            }
            (Some(_), Some(_)) => return Err(Malformed::UsernameAndUserhash),
            (None, None) => return Err(Malformed::Missing),
        };
        let (Some(realm), Some(nonce)) = (req.attr(ATTR_REALM), req.attr(ATTR_NONCE)) else {
            return Err(Malformed::Missing);
        };
        let algorithm = password_algorithm(req, nonce)?;
        Ok(Some(Self {
            user,
            realm,
            nonce,
            algorithm,
            integrity,
            signed,
        }))
    }

    /// Finds the user and the key that verifies the request's integrity (RFC 8489 §9.2.4:
    /// each failure is a 401). Call once the nonce is known to be valid.
    pub(crate) fn authenticate(
        &self,
        credentials: &Credentials,
        unix_secs: u64,
    ) -> Result<Auth, CredentialError> {
        if self.realm != credentials.realm().as_bytes() {
            return Err(CredentialError::ForeignRealm);
        }
        let username = match self.user {
            User::Name(name) => {
                std::str::from_utf8(name).map_err(|_| CredentialError::UnknownUser)?
            }
            User::Hash(hash) => credentials
                .user_by_hash(hash)
                .ok_or(CredentialError::UnknownUserhash)?,
        };
        let (prefix, length, value) = self.signed;
        let key = credentials
            .keys_for(username, self.algorithm, unix_secs)?
            .iter()
            .find(|key| self.integrity.verify(key.as_bytes(), prefix, length, value))
            .copied()
            .ok_or(CredentialError::IntegrityMismatch)?;
        Ok(Auth {
            username: username.to_owned(),
            key: SigningKey {
                key,
                integrity: self.integrity,
            },
        })
    }
}

/// The password algorithm of `req` (RFC 8489 §9.2.4). Under a nonce whose cookie announces
/// "Password algorithms", PASSWORD-ALGORITHM and PASSWORD-ALGORITHMS come together, the latter
/// exactly as the server sent it; otherwise PASSWORD-ALGORITHM alone is honoured, as in the
/// RFC's own example (Appendix B.1). Without either, MD5. Every nonce this server accepts
/// announces the feature, and its MAC covers the announcement.
fn password_algorithm(req: &Parsed<'_>, nonce: &[u8]) -> Result<PasswordAlgorithm, Malformed> {
    let algorithm = req.attr(ATTR_PASSWORD_ALGORITHM);
    let algorithms = req.attr(ATTR_PASSWORD_ALGORITHMS);
    let negotiated = SecurityFeatures::from_nonce(nonce)
        .is_some_and(|f| f.contains(SecurityFeatures::PASSWORD_ALGORITHMS));
    if negotiated {
        match (algorithm, algorithms) {
            (None, None) => return Ok(PasswordAlgorithm::Md5),
            (Some(_), Some(algorithms)) if algorithms != PASSWORD_ALGORITHMS => {
                return Err(Malformed::AlgorithmsAltered);
            }
            (Some(_), Some(_)) => {}
            _ => return Err(Malformed::AlgorithmsIncomplete),
        }
    }
    let Some(algorithm) = algorithm else {
        return Ok(PasswordAlgorithm::Md5);
    };
    // §14.12: number, parameter length, parameters. MD5 and SHA-256 take no parameters.
    match algorithm {
        [hi, lo, 0, 0] => PasswordAlgorithm::from_number(u16::from_be_bytes([*hi, *lo]))
            .filter(|a| PasswordAlgorithm::OFFERED.contains(a))
            .ok_or(Malformed::UnknownAlgorithm),
        _ => Err(Malformed::UnknownAlgorithm),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{LongTermKey, userhash, verify_integrity_sha256};
    use crate::stun::{Builder, parse};
    use rtc_stun::message::{CLASS_REQUEST, METHOD_BINDING, TransactionId};

    const MATRIX_USER: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
    const MATRIX_NONCE: &[u8] = b"obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA";

    /// RFC 8489 Appendix B.1 byte for byte, but for the message length: the RFC says 0x9c,
    /// erratum 6268 corrects it to 0x90, the length of the attributes shown.
    const APPENDIX_B1: [u8; 164] = [
        0x00, 0x01, 0x00, 0x90, // Request type and message length (erratum 6268)
        0x21, 0x12, 0xa4, 0x42, // Magic cookie
        0x78, 0xad, 0x34, 0x33, // }
        0xc6, 0xad, 0x72, 0xc0, // }  Transaction ID
        0x29, 0xda, 0x41, 0x2e, // }
        0x00, 0x1e, 0x00, 0x20, // USERHASH attribute header
        0x4a, 0x3c, 0xf3, 0x8f, // }
        0xef, 0x69, 0x92, 0xbd, // }
        0xa9, 0x52, 0xc6, 0x78, // }
        0x04, 0x17, 0xda, 0x0f, // }  Userhash value (32 bytes)
        0x24, 0x81, 0x94, 0x15, // }
        0x56, 0x9e, 0x60, 0xb2, // }
        0x05, 0xc4, 0x6e, 0x41, // }
        0x40, 0x7f, 0x17, 0x04, // }
        0x00, 0x15, 0x00, 0x29, // NONCE attribute header
        0x6f, 0x62, 0x4d, 0x61, // }
        0x74, 0x4a, 0x6f, 0x73, // }
        0x32, 0x41, 0x41, 0x41, // }
        0x43, 0x66, 0x2f, 0x2f, // }
        0x34, 0x39, 0x39, 0x6b, // }  Nonce value and padding (3 bytes)
        0x39, 0x35, 0x34, 0x64, // }
        0x36, 0x4f, 0x4c, 0x33, // }
        0x34, 0x6f, 0x4c, 0x39, // }
        0x46, 0x53, 0x54, 0x76, // }
        0x79, 0x36, 0x34, 0x73, // }
        0x41, 0x00, 0x00, 0x00, // }
        0x00, 0x14, 0x00, 0x0b, // REALM attribute header
        0x65, 0x78, 0x61, 0x6d, // }
        0x70, 0x6c, 0x65, 0x2e, // }  Realm value (11 bytes) and padding (1 byte)
        0x6f, 0x72, 0x67, 0x00, // }
        0x00, 0x1d, 0x00, 0x04, // PASSWORD-ALGORITHM attribute header
        0x00, 0x02, 0x00, 0x00, // PASSWORD-ALGORITHM value (4 bytes)
        0x00, 0x1c, 0x00, 0x20, // MESSAGE-INTEGRITY-SHA256 attribute header
        0xb5, 0xc7, 0xbf, 0x00, // }
        0x5b, 0x6c, 0x52, 0xa2, // }
        0x1c, 0x51, 0xc5, 0xe8, // }
        0x92, 0xf8, 0x19, 0x24, // }  HMAC-SHA256 value
        0x13, 0x62, 0x96, 0xcb, // }
        0x92, 0x7c, 0x43, 0x14, // }
        0x93, 0x09, 0x27, 0x8c, // }
        0xc6, 0x51, 0x8e, 0x65, // }
    ];

    fn matrix_credentials() -> Credentials {
        // The password after OpaqueString, as the RFC gives it.
        Credentials::new("example.org").with_user(MATRIX_USER, "TheMatrIX")
    }

    #[test]
    fn rfc8489_appendix_b1_verifies() {
        let req = parse(&APPENDIX_B1).unwrap();
        assert_eq!(req.raw.len(), APPENDIX_B1.len());
        assert_eq!(req.method(), METHOD_BINDING);
        assert_eq!(req.class(), CLASS_REQUEST);
        let offer = Offer::read(&req).unwrap().unwrap();
        let hash = userhash(MATRIX_USER, "example.org");
        assert_eq!(hash[..], APPENDIX_B1[24..56]);
        assert_eq!(offer.user, User::Hash(&hash));
        assert_eq!(offer.realm, b"example.org");
        assert_eq!(offer.nonce, MATRIX_NONCE);
        assert_eq!(offer.algorithm, PasswordAlgorithm::Sha256);
        assert_eq!(
            SecurityFeatures::from_nonce(offer.nonce),
            Some(SecurityFeatures::USERNAME_ANONYMITY)
        );

        // The HMAC-SHA256 with the SHA-256 key of the vector's credentials.
        let key = LongTermKey::new(
            PasswordAlgorithm::Sha256,
            MATRIX_USER,
            "example.org",
            "TheMatrIX",
        );
        let (prefix, length, value) = req.signed(Integrity::Sha256).unwrap();
        assert_eq!(prefix, &APPENDIX_B1[..128]);
        assert_eq!(length, 0x90);
        assert_eq!(value, &APPENDIX_B1[132..]);
        assert!(verify_integrity_sha256(
            key.as_bytes(),
            prefix,
            length,
            value
        ));
        let md5 = LongTermKey::new(
            PasswordAlgorithm::Md5,
            MATRIX_USER,
            "example.org",
            "TheMatrIX",
        );
        assert!(!verify_integrity_sha256(
            md5.as_bytes(),
            prefix,
            length,
            value
        ));

        // The whole check: the user found by its hash, the SHA-256 key, signing alike.
        let auth = offer.authenticate(&matrix_credentials(), 0).unwrap();
        assert_eq!(auth.username, MATRIX_USER);
        assert_eq!(
            auth.key,
            SigningKey {
                key,
                integrity: Integrity::Sha256
            }
        );
        let other = Credentials::new("example.org").with_user(MATRIX_USER, "TheMatrix");
        assert_eq!(
            offer.authenticate(&other, 0).unwrap_err(),
            CredentialError::IntegrityMismatch
        );
        let elsewhere = Credentials::new("example.com").with_user(MATRIX_USER, "TheMatrIX");
        assert_eq!(
            offer.authenticate(&elsewhere, 0).unwrap_err(),
            CredentialError::ForeignRealm
        );
    }

    #[test]
    fn rfc8489_appendix_b1_with_the_published_length_is_not_stun() {
        // 0x9c announces 20 bytes more than the datagram holds.
        let mut published = APPENDIX_B1;
        published[3] = 0x9c;
        assert!(parse(&published).is_err());
    }

    #[test]
    fn password_algorithms_lists_sha256_then_md5() {
        assert_eq!(PASSWORD_ALGORITHMS, [0, 2, 0, 0, 0, 1, 0, 0]);
    }

    /// A request signed with MESSAGE-INTEGRITY-SHA256 under `nonce` with the attributes `f`
    /// adds.
    fn request(nonce: &[u8], f: impl FnOnce(&mut Builder)) -> Vec<u8> {
        let mut b = Builder::new(METHOD_BINDING, CLASS_REQUEST, TransactionId([1; 12]));
        b.raw(ATTR_USERNAME, b"bob")
            .raw(ATTR_REALM, b"r")
            .raw(ATTR_NONCE, nonce);
        f(&mut b);
        let key = SigningKey {
            key: LongTermKey::new(PasswordAlgorithm::Sha256, "bob", "r", "pw"),
            integrity: Integrity::Sha256,
        };
        b.finish(None, Some(&key), false)
    }

    fn read(wire: &[u8]) -> Result<Option<PasswordAlgorithm>, Malformed> {
        Offer::read(&parse(wire).unwrap()).map(|o| o.map(|o| o.algorithm))
    }

    #[test]
    fn password_algorithm_negotiation_follows_rfc8489_9_2_4() {
        let negotiated = b"obMatJos2AAAB0000";
        let sha256 = [0, 2, 0, 0];
        let both = |alg: &'static [u8], algs: &'static [u8]| {
            move |b: &mut Builder| {
                b.raw(ATTR_PASSWORD_ALGORITHM, alg)
                    .raw(ATTR_PASSWORD_ALGORITHMS, algs);
            }
        };
        // Neither: MD5.
        assert_eq!(
            read(&request(negotiated, |_| {})),
            Ok(Some(PasswordAlgorithm::Md5))
        );
        // Both, the list unaltered.
        assert_eq!(
            read(&request(
                negotiated,
                both(&[0, 2, 0, 0], &PASSWORD_ALGORITHMS)
            )),
            Ok(Some(PasswordAlgorithm::Sha256))
        );
        assert_eq!(
            read(&request(
                negotiated,
                both(&[0, 1, 0, 0], &PASSWORD_ALGORITHMS)
            )),
            Ok(Some(PasswordAlgorithm::Md5))
        );
        // One without the other.
        assert_eq!(
            read(&request(negotiated, |b| {
                b.raw(ATTR_PASSWORD_ALGORITHM, &sha256);
            })),
            Err(Malformed::AlgorithmsIncomplete)
        );
        assert_eq!(
            read(&request(negotiated, |b| {
                b.raw(ATTR_PASSWORD_ALGORITHMS, &PASSWORD_ALGORITHMS);
            })),
            Err(Malformed::AlgorithmsIncomplete)
        );
        // The list altered: MD5 only, reordered, emptied.
        for altered in [&[0, 1, 0, 0][..], &[0, 1, 0, 0, 0, 2, 0, 0], &[]] {
            assert_eq!(
                read(&request(negotiated, |b| {
                    b.raw(ATTR_PASSWORD_ALGORITHM, &[0, 1, 0, 0])
                        .raw(ATTR_PASSWORD_ALGORITHMS, altered);
                })),
                Err(Malformed::AlgorithmsAltered),
                "{altered:?}"
            );
        }
        // Unknown algorithms, parameters where there are none.
        for alg in [
            &[0, 3, 0, 0][..],
            &[0, 0, 0, 0],
            &[0, 2, 0, 4, 1, 2, 3, 4],
            &[0, 2],
        ] {
            assert_eq!(
                read(&request(negotiated, |b| {
                    b.raw(ATTR_PASSWORD_ALGORITHM, alg)
                        .raw(ATTR_PASSWORD_ALGORITHMS, &PASSWORD_ALGORITHMS);
                })),
                Err(Malformed::UnknownAlgorithm),
                "{alg:?}"
            );
        }
        // A nonce without the feature: PASSWORD-ALGORITHM alone counts.
        assert_eq!(
            read(&request(b"obMatJos2AAAC0000", |b| {
                b.raw(ATTR_PASSWORD_ALGORITHM, &sha256);
            })),
            Ok(Some(PasswordAlgorithm::Sha256))
        );
        assert_eq!(
            read(&request(b"legacy", |b| {
                b.raw(ATTR_PASSWORD_ALGORITHM, &[0, 9, 0, 0]);
            })),
            Err(Malformed::UnknownAlgorithm)
        );
    }

    #[test]
    fn user_realm_and_nonce_are_required_and_userhash_is_32_bytes() {
        let unsigned = |f: &dyn Fn(&mut Builder)| {
            let mut b = Builder::new(METHOD_BINDING, CLASS_REQUEST, TransactionId([1; 12]));
            f(&mut b);
            b.finish(None, Some(&SigningKey::classic([0; 16])), false)
        };
        let read_user = |wire: &[u8]| {
            Offer::read(&parse(wire).unwrap()).map(|o| o.map(|o| format!("{:?}", o.user)))
        };
        let wire = unsigned(&|b| {
            b.raw(ATTR_USERNAME, b"u").raw(ATTR_NONCE, b"n");
        });
        assert_eq!(read_user(&wire), Err(Malformed::Missing));
        let wire = unsigned(&|b| {
            b.raw(ATTR_REALM, b"r").raw(ATTR_NONCE, b"n");
        });
        assert_eq!(read_user(&wire), Err(Malformed::Missing));
        let wire = unsigned(&|b| {
            b.raw(ATTR_USERNAME, b"u")
                .raw(ATTR_USER_HASH, &[0; 32])
                .raw(ATTR_REALM, b"r")
                .raw(ATTR_NONCE, b"n");
        });
        assert_eq!(read_user(&wire), Err(Malformed::UsernameAndUserhash));
        let wire = unsigned(&|b| {
            b.raw(ATTR_USER_HASH, &[0; 20])
                .raw(ATTR_REALM, b"r")
                .raw(ATTR_NONCE, b"n");
        });
        assert_eq!(read_user(&wire), Err(Malformed::UserhashLength));
        let wire = unsigned(&|b| {
            b.raw(ATTR_USER_HASH, &[9; 32])
                .raw(ATTR_REALM, b"r")
                .raw(ATTR_NONCE, b"n");
        });
        let hash = format!("{:?}", User::Hash(&[9; 32]));
        assert_eq!(read_user(&wire), Ok(Some(hash)));
        // No integrity at all: not malformed, a challenge.
        let mut b = Builder::new(METHOD_BINDING, CLASS_REQUEST, TransactionId([1; 12]));
        b.raw(ATTR_USERNAME, b"u");
        assert!(read(&b.finish(None, None, false)).unwrap().is_none());
    }
}
