//! Cluster identity: the cluster CA, node certificates, and the TLS configurations built on
//! them. A node's certificate names it as `node-ID.tern` (plus the host it is reached at), so a
//! peer proves which node it is by presenting a certificate the CA signed for that name.
//!
//! Files under `DATA/tls/`: `ca.pem`, `ca.key` (every member holds the CA key so that whoever is
//! leader can admit a joining node; a member can commit anything anyway), `node.pem`,
//! `node.key`. Keys are written 0600 in a 0700 directory.
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad PEM: {0}")]
    Pem(String),
}

/// The DNS name a node's certificate carries and peers verify: `node-ID.tern`.
pub fn node_name(id: u64) -> String {
    format!("node-{id}.tern")
}

/// The crypto provider every Tern TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Hex SHA-256 of `bytes` (token hashes, CA fingerprints).
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// 256 random bits as 64 hex digits (token secrets).
pub fn random_secret() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    // The OS random source failing is not recoverable; fall back would be insecure.
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the OS random number generator failed");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn first_cert(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Pem(e.to_string()))
}

/// Hex SHA-256 of the first certificate's DER in `pem` (what a join token pins).
pub fn fingerprint(pem: &str) -> Result<String, PkiError> {
    Ok(sha256_hex(&first_cert(pem)?))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// The cluster's certificate authority.
pub struct ClusterCa {
    pub cert_pem: String,
    key_pem: String,
}

impl ClusterCa {
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Tern cluster CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, 3650);
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn from_pem(cert_pem: String, key_pem: String) -> Self {
        ClusterCa { cert_pem, key_pem }
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A certificate for node `id` reachable at `hosts`, for the key in `csr_pem`. The CSR's
    /// signature proves the requester holds the key; its names are ignored: the CA decides
    /// them from the id it admits.
    pub fn issue_node_cert(
        &self,
        csr_pem: &str,
        id: u64,
        hosts: &[String],
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let ca = CertificateParams::from_ca_cert_pem(&self.cert_pem)?.self_signed(&ca_key)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_name(id));
        params.distinguished_name = dn;
        params.subject_alt_names = node_sans(id, hosts)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, 365);
        Ok(params.signed_by(&csr.public_key, &ca, &ca_key)?.pem())
    }
}

fn node_sans(id: u64, hosts: &[String]) -> Result<Vec<SanType>, PkiError> {
    let mut sans = vec![SanType::DnsName(node_name(id).try_into()?)];
    for host in hosts {
        match host.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() => {
                sans.push(SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
                sans.push(SanType::DnsName("localhost".try_into()?));
            }
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => sans.push(SanType::DnsName(host.as_str().try_into()?)),
        }
    }
    Ok(sans)
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// A fresh node key and a CSR for it (PEM, PEM).
pub fn node_key_and_csr(id: u64) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_name(id));
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Whether `cert` (already chain-verified against the cluster CA) names node `id`.
pub fn cert_names_node(cert: &CertificateDer<'_>, id: u64) -> bool {
    let Ok(name) = ServerName::try_from(node_name(id)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .and_then(|c| c.verify_is_valid_for_subject_name(&name))
        .is_ok()
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(first_cert(ca_pem)?)?;
    Ok(Arc::new(roots))
}

/// TLS for an operator's client: the cluster CA pinned, no client certificate.
pub fn operator_client_config(ca_pem: &str) -> Result<ClientConfig, PkiError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth())
}

/// This node's identity: the cluster CA and its own certificate and key.
pub struct NodeTls {
    pub id: u64,
    pub ca: ClusterCa,
    pub cert_pem: String,
    key_pem: String,
}

fn tls_dir(data: &Path) -> PathBuf {
    data.join("tls")
}

fn read(path: PathBuf) -> Result<String, PkiError> {
    std::fs::read_to_string(&path).map_err(|source| PkiError::Io { path, source })
}

fn write(path: PathBuf, text: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.clone(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

impl NodeTls {
    /// A new cluster: a new CA and this node's certificate signed by it.
    pub fn bootstrap(id: u64, hosts: &[String]) -> Result<Self, PkiError> {
        let ca = ClusterCa::generate()?;
        let (key_pem, csr) = node_key_and_csr(id)?;
        let cert_pem = ca.issue_node_cert(&csr, id, hosts)?;
        Ok(NodeTls {
            id,
            ca,
            cert_pem,
            key_pem,
        })
    }

    pub fn new(id: u64, ca: ClusterCa, cert_pem: String, key_pem: String) -> Self {
        NodeTls {
            id,
            ca,
            cert_pem,
            key_pem,
        }
    }

    /// The identity saved in `data`, if this node has one.
    pub fn load(data: &Path, id: u64) -> Result<Option<Self>, PkiError> {
        let dir = tls_dir(data);
        if !dir.join("node.pem").exists() {
            return Ok(None);
        }
        let ca = ClusterCa::from_pem(read(dir.join("ca.pem"))?, read(dir.join("ca.key"))?);
        Ok(Some(NodeTls {
            id,
            ca,
            cert_pem: read(dir.join("node.pem"))?,
            key_pem: read(dir.join("node.key"))?,
        }))
    }

    pub fn save(&self, data: &Path) -> Result<(), PkiError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = tls_dir(data);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| PkiError::Io {
                path: dir.clone(),
                source,
            })?;
        write(dir.join("ca.key"), self.ca.key_pem(), true)?;
        write(dir.join("node.key"), &self.key_pem, true)?;
        write(dir.join("ca.pem"), &self.ca.cert_pem, false)?;
        // Last: its presence marks a complete identity.
        write(dir.join("node.pem"), &self.cert_pem, false)
    }

    fn identity(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| PkiError::Pem(e.to_string()))?;
        Ok((vec![first_cert(&self.cert_pem)?], key))
    }

    /// The listener's TLS: this node's certificate; a client certificate is optional (operators
    /// have none) but, when given, must chain to the cluster CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, PkiError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots(&self.ca.cert_pem)?, provider())
                .allow_unauthenticated()
                .build()?;
        let (chain, key) = self.identity()?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// TLS for calls to peers: the cluster CA pinned and this node's certificate presented.
    /// The peer's name (`node_name(id)`) is checked by whoever builds the URL.
    pub fn peer_client_config(&self) -> Result<ClientConfig, PkiError> {
        let (chain, key) = self.identity()?;
        Ok(ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(&self.ca.cert_pem)?)
            .with_client_auth_cert(chain, key)?)
    }
}

/// A verifier that accepts any server certificate. Only for fetching the cluster CA before a
/// join, whose fingerprint the join token pins: the fetched CA is checked, not trusted.
#[derive(Debug)]
pub struct FetchOnlyVerifier(Arc<CryptoProvider>);

impl FetchOnlyVerifier {
    pub fn client_config() -> ClientConfig {
        let provider = provider();
        ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.dangerous()
                    .with_custom_certificate_verifier(Arc::new(FetchOnlyVerifier(provider)))
                    .with_no_client_auth()
            })
            // The ring provider supports the default versions; this cannot fail.
            .expect("ring supports TLS 1.2 and 1.3")
    }
}

impl ServerCertVerifier for FetchOnlyVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_names_its_node_and_no_other() {
        let tls = NodeTls::bootstrap(7, &["127.0.0.1:7401".to_string()]).unwrap();
        let cert = first_cert(&tls.cert_pem).unwrap();
        assert!(cert_names_node(&cert, 7));
        assert!(!cert_names_node(&cert, 8));
        assert!(!cert_names_node(&cert, 70));
    }

    #[test]
    fn the_ca_ignores_names_in_the_csr() {
        let ca = ClusterCa::generate().unwrap();
        // A CSR that asks for node 1's name gets a certificate for the admitted id only.
        let (_key, csr) = node_key_and_csr(1).unwrap();
        let pem = ca.issue_node_cert(&csr, 4, &["10.0.0.4".into()]).unwrap();
        let cert = first_cert(&pem).unwrap();
        assert!(cert_names_node(&cert, 4));
        assert!(!cert_names_node(&cert, 1));
    }

    #[test]
    fn garbage_csrs_and_pems_are_errors_not_panics() {
        let ca = ClusterCa::generate().unwrap();
        assert!(ca.issue_node_cert("not a csr", 2, &[]).is_err());
        assert!(ca.issue_node_cert(&ca.cert_pem, 2, &[]).is_err());
        assert!(fingerprint("nothing").is_err());
        assert!(operator_client_config(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )
        .is_err());
    }

    #[test]
    fn identity_survives_save_and_load_with_private_keys_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(NodeTls::load(dir.path(), 1).unwrap().is_none());
        let tls = NodeTls::bootstrap(1, &["127.0.0.1:1".to_string()]).unwrap();
        tls.save(dir.path()).unwrap();
        let back = NodeTls::load(dir.path(), 1).unwrap().unwrap();
        assert_eq!(back.cert_pem, tls.cert_pem);
        assert_eq!(back.ca.cert_pem, tls.ca.cert_pem);
        for key in ["ca.key", "node.key"] {
            let mode = std::fs::metadata(dir.path().join("tls").join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{key} is readable by others: {mode:o}");
        }
        back.server_config().unwrap();
        back.peer_client_config().unwrap();
    }

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("127.0.0.1:7401"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7401"), "::1");
        assert_eq!(host_of("node.example:80"), "node.example");
    }
}
