//! Certificates for the TLS tests: a private CA and leaf certificates it signs, written as
//! PEM files the way an operator's are (`fullchain.pem` with the leaf first, then the CA;
//! `privkey.pem` with the leaf's PKCS#8 key).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// A certificate's PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The chain: the leaf, then the CA.
    pub cert: PathBuf,
    /// The leaf's private key.
    pub key: PathBuf,
    /// The CA alone, for clients that verify.
    pub ca: PathBuf,
    /// The leaf's DER, to compare with what a client was served.
    pub leaf_der: Vec<u8>,
}

/// The validity of a leaf, in days relative to now: `-2..-1` is expired, `-1..30` is good.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Days from now to notBefore (negative: in the past).
    pub from_days: i32,
    /// Days from now to notAfter.
    pub until_days: i32,
}

impl Validity {
    /// Valid from yesterday for `days` days.
    pub fn days(days: i32) -> Self {
        Validity {
            from_days: -1,
            until_days: days,
        }
    }

    /// Expired yesterday.
    pub fn expired() -> Self {
        Validity {
            from_days: -30,
            until_days: -1,
        }
    }
}

/// Writes `<dir>/<name>.{crt,key,ca.crt}`: a leaf for `names` (IP addresses become IP SANs,
/// the rest DNS SANs) valid for `validity`, signed by a fresh CA.
pub fn certificate(
    dir: &Path,
    name: &str,
    names: &[&str],
    validity: Validity,
) -> anyhow::Result<CertFiles> {
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    ca_params.not_before = now - day * 2;
    ca_params.not_after = now + day * 3650;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = names
        .iter()
        .map(|name| match name.parse() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName((*name).try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params
        .distinguished_name
        .push(DnType::CommonName, names.first().copied().unwrap_or(name));
    params.not_before = now + day * validity.from_days;
    params.not_after = now + day * validity.until_days;
    let key = KeyPair::generate()?;
    let leaf = params.signed_by(&key, &issuer)?;

    let files = CertFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        ca: dir.join(format!("{name}.ca.crt")),
        leaf_der: leaf.der().to_vec(),
    };
    let write = |path: &Path, contents: String| {
        std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
    };
    write(&files.cert, format!("{}{}", leaf.pem(), ca_cert.pem()))?;
    write(&files.key, key.serialize_pem())?;
    write(&files.ca, ca_cert.pem())?;
    Ok(files)
}
