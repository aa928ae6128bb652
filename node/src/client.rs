//! How operators (the CLI, `tern demo`, tests, benchmarks) reach a node: HTTPS with the
//! cluster CA pinned and a bearer token. The settings come from a TOML file
//! (`~/.config/tern/config.toml`, or `TERN_CONFIG`), each overridden by `TERN_SERVER`,
//! `TERN_TOKEN` and `TERN_CA` (a PEM file). A bootstrapping node writes an admin config.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::pki::operator_client_config;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("no API token: set TERN_TOKEN or write {0} (a bootstrapping node writes one)")]
    NoToken(String),
    #[error("no cluster CA: set TERN_CA or write {0} (a bootstrapping node writes one)")]
    NoCa(String),
    #[error("tls: {0}")]
    Tls(#[from] crate::pki::PkiError),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("bad token: {0}")]
    BadToken(String),
}

/// What an operator's client needs: where, as whom, and which CA to trust.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorConfig {
    #[serde(default)]
    pub server: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    /// The cluster CA certificate (PEM).
    #[serde(default)]
    pub ca: Option<String>,
}

/// `TERN_CONFIG`, else `$XDG_CONFIG_HOME/tern/config.toml`, else `~/.config/tern/config.toml`.
pub fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TERN_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("tern").join("config.toml"))
}

fn file_err(path: &Path, reason: impl ToString) -> ClientError {
    ClientError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

impl OperatorConfig {
    pub fn read(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
        toml::from_str(&text).map_err(|e| file_err(path, e))
    }

    /// Write the file readable by its owner only (it holds a token).
    pub fn write(&self, path: &Path) -> Result<(), ClientError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        }
        let text = toml::to_string(self).map_err(|e| file_err(path, e))?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| file_err(&tmp, e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| file_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
    }

    /// The file (if any) overridden by the environment.
    pub fn from_env() -> Result<Self, ClientError> {
        let mut cfg = match default_path() {
            Some(p) if p.exists() => Self::read(&p)?,
            _ => OperatorConfig::default(),
        };
        if let Ok(s) = std::env::var("TERN_SERVER") {
            cfg.server = Some(s);
        }
        if let Ok(t) = std::env::var("TERN_TOKEN") {
            cfg.token = Some(t);
        }
        if let Some(p) = std::env::var_os("TERN_CA") {
            let p = PathBuf::from(p);
            cfg.ca = Some(std::fs::read_to_string(&p).map_err(|e| file_err(&p, e))?);
        }
        Ok(cfg)
    }

    fn where_from() -> String {
        default_path().map_or("~/.config/tern/config.toml".into(), |p| {
            p.display().to_string()
        })
    }

    fn parts(&self) -> Result<(rustls::ClientConfig, reqwest::header::HeaderMap), ClientError> {
        let ca = self
            .ca
            .as_deref()
            .ok_or_else(|| ClientError::NoCa(Self::where_from()))?;
        let token = self
            .token
            .as_deref()
            .ok_or_else(|| ClientError::NoToken(Self::where_from()))?;
        let mut headers = reqwest::header::HeaderMap::new();
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| ClientError::BadToken(e.to_string()))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
        Ok((operator_client_config(ca)?, headers))
    }

    /// A blocking client that trusts only the cluster CA and sends the token.
    pub fn blocking_client(
        &self,
        timeout: Duration,
    ) -> Result<reqwest::blocking::Client, ClientError> {
        let (tls, headers) = self.parts()?;
        Ok(reqwest::blocking::Client::builder()
            .use_preconfigured_tls(tls)
            .default_headers(headers)
            .timeout(timeout)
            .build()?)
    }

    /// An async client that trusts only the cluster CA and sends the token.
    pub fn async_client(&self, timeout: Duration) -> Result<reqwest::Client, ClientError> {
        let (tls, headers) = self.parts()?;
        Ok(reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .default_headers(headers)
            .tcp_nodelay(true)
            .timeout(timeout)
            .build()?)
    }
}

/// The URL of `path` on the node at `server` (host:port).
pub fn url(server: &str, path: &str) -> String {
    format!("https://{server}{path}")
}

/// Where a bootstrapping node leaves its admin config, in its data directory.
pub fn admin_config_path(data: &Path) -> PathBuf {
    data.join("admin.toml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_stays_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        let cfg = OperatorConfig {
            server: Some("127.0.0.1:7401".into()),
            token: Some("abc".into()),
            ca: Some("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n".into()),
        };
        cfg.write(&path).unwrap();
        assert_eq!(OperatorConfig::read(&path).unwrap(), cfg);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
    }

    #[test]
    fn a_config_without_token_or_ca_says_what_is_missing() {
        let no_token = OperatorConfig {
            ca: Some(crate::pki::ClusterCa::generate().unwrap().cert_pem),
            ..Default::default()
        };
        let err = no_token
            .blocking_client(Duration::from_secs(1))
            .unwrap_err();
        assert!(err.to_string().contains("TERN_TOKEN"), "{err}");
        let no_ca = OperatorConfig {
            token: Some("t".into()),
            ..Default::default()
        };
        let err = no_ca.blocking_client(Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("TERN_CA"), "{err}");
        assert!(OperatorConfig::read(Path::new("/nonexistent/x.toml")).is_err());
    }
}
