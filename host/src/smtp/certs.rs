//! Inbound certificates: a listener may have several, and each handshake
//! gets the one valid for the name the client asked for (SNI), else the
//! listener's `tls_cert`. The files are read again when they change (a
//! renewal replacing them, by rename or in place) and on SIGHUP, which also
//! picks up new file names from the config: the next handshake gets the new
//! certificate, and sessions already in TLS keep theirs. A set that does not
//! load (a key written before its certificate, say) leaves the previous one
//! in place and the log says why; the next change of a file tries again.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::mpsc;

use crate::config::{Config, ListenerConfig};
use crate::smtp::tls::Error;

/// Quiet time after the last change of a watched file before reading it: a
/// renewal writes the certificate and the key one after the other.
const SETTLE: Duration = Duration::from_millis(100);

/// A listener's address (as configured) and its certificates.
pub type Listening = (SocketAddr, Arc<Certificates>);

/// A certificate chain file and its key file, absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// The certificate files of a listener, default first; none when it does
/// not do TLS.
pub fn pairs(config: &Config, l: &ListenerConfig) -> Vec<Pair> {
    let (Some(cert), Some(key)) = (&l.tls_cert, &l.tls_key) else {
        return Vec::new();
    };
    let mut pairs = vec![Pair {
        cert: config.resolve(cert),
        key: config.resolve(key),
    }];
    pairs.extend(l.tls_certificates.iter().map(|c| Pair {
        cert: config.resolve(&c.cert),
        key: config.resolve(&c.key),
    }));
    pairs
}

/// One listener's certificates, as the rustls resolver of its acceptor.
#[derive(Debug)]
pub struct Certificates {
    /// Where they come from, the default first.
    pairs: Mutex<Vec<Pair>>,
    /// What handshakes use, the default first; replaced whole.
    loaded: RwLock<Arc<Vec<Arc<CertifiedKey>>>>,
}

impl Certificates {
    /// Reads every pair; any failure fails the whole, naming the file.
    pub fn load(pairs: Vec<Pair>) -> Result<Arc<Certificates>, Error> {
        let loaded = load_all(&pairs)?;
        Ok(Arc::new(Certificates {
            pairs: Mutex::new(pairs),
            loaded: RwLock::new(Arc::new(loaded)),
        }))
    }

    /// Reads the files again (with `pairs`, from now on those files) and
    /// uses them for the next handshakes; on failure the previous
    /// certificates and files stay.
    pub fn reload(&self, pairs: Option<Vec<Pair>>) -> Result<(), Error> {
        let mut current = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        let pairs = pairs.unwrap_or_else(|| current.clone());
        let loaded = load_all(&pairs)?;
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        *current = pairs;
        Ok(())
    }

    /// Every file they come from.
    pub fn files(&self) -> Vec<PathBuf> {
        self.pairs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flat_map(|p| [p.cert.clone(), p.key.clone()])
            .collect()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = self
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let by_name = hello
            .server_name()
            .and_then(|name| ServerName::try_from(name).ok())
            .and_then(|name| loaded.iter().skip(1).find(|ck| valid_for(ck, &name)));
        by_name.or(loaded.first()).cloned()
    }
}

/// The certificate names `name` (its subject alternative names, wildcards
/// included).
fn valid_for(ck: &CertifiedKey, name: &ServerName<'_>) -> bool {
    let Some(der) = ck.cert.first() else {
        return false;
    };
    webpki::EndEntityCert::try_from(der)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(name).is_ok())
}

fn load_all(pairs: &[Pair]) -> Result<Vec<Arc<CertifiedKey>>, Error> {
    pairs.iter().map(|p| load_pair(p).map(Arc::new)).collect()
}

/// A certificate chain and its key, checked to belong together.
pub(crate) fn load_pair(p: &Pair) -> Result<CertifiedKey, Error> {
    let pem_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls_pki_types::pem::Error| Error::Pem {
            path,
            message: e.to_string(),
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&p.cert)
        .map_err(pem_err(&p.cert))?
        .collect::<Result<_, _>>()
        .map_err(pem_err(&p.cert))?;
    if certs.is_empty() {
        return Err(Error::Pem {
            path: p.cert.clone(),
            message: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&p.key).map_err(pem_err(&p.key))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, key, &provider).map_err(|source| Error::Config {
        cert: p.cert.clone(),
        key: p.key.clone(),
        source,
    })
}

/// Reloads every listener's certificates, with the files the config at
/// `config_path` names when it still loads and names them (SIGHUP), else
/// with the files they had.
pub fn reload_all(stores: &[Listening], config_path: Option<&Path>) {
    let config = config_path.and_then(|path| match Config::load(path) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "config not readable; certificates reloaded from the files they had");
            None
        }
    });
    for (address, store) in stores {
        let pairs = config.as_ref().and_then(|c| {
            let l = c.listeners.iter().find(|l| l.address == *address)?;
            Some(pairs(c, l)).filter(|p| !p.is_empty())
        });
        match store.reload(pairs) {
            Ok(()) => tracing::info!(listener = %address, "certificates reloaded"),
            Err(e) => {
                tracing::error!(listener = %address, error = %e, "certificates not reloaded; the previous ones stay in use")
            }
        }
    }
}

/// Watches the certificate files of every listener and listens for SIGHUP
/// until dropped.
pub struct CertWatcher {
    _watcher: Option<notify::RecommendedWatcher>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CertWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CertWatcher {
    /// Starts watching the folders of the files (editors and renewal tools
    /// replace files by rename, which a watch on the file itself misses).
    /// `config_path` is re-read on SIGHUP.
    pub fn start(stores: Vec<Listening>, config_path: PathBuf) -> CertWatcher {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let watcher = match watch(&stores, tx.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the certificate files; they are reloaded on SIGHUP only");
                None
            }
        };
        let task = tokio::spawn(async move {
            let mut hup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; certificates are reloaded on file changes only");
                    None
                }
            };
            loop {
                let signal = tokio::select! {
                    changed = rx.recv() => {
                        if changed.is_none() {
                            return;
                        }
                        false
                    }
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
                };
                // A burst of events (certificate, then key) is one reload.
                while let Ok(Some(())) = tokio::time::timeout(SETTLE, rx.recv()).await {}
                let stores = stores.clone();
                let path = config_path.clone();
                // File reads and key parsing: off the runtime's workers.
                let _ = tokio::task::spawn_blocking(move || {
                    reload_all(&stores, signal.then_some(path.as_path()))
                })
                .await;
            }
        });
        CertWatcher {
            _watcher: watcher,
            task,
        }
    }
}

fn watch(
    stores: &[Listening],
    tx: mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let files: HashSet<PathBuf> = stores.iter().flat_map(|(_, s)| s.files()).collect();
    let names: HashSet<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_os_string()))
        .collect();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        let ours = event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|n| names.contains(n)));
        if ours {
            let _ = tx.send(());
        }
    })?;
    let folders: HashSet<&Path> = files.iter().filter_map(|f| f.parent()).collect();
    for folder in folders {
        watcher.watch(folder, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}
