//! Remotes as `.dvc/config` configures them, reached through the `object_store` crate: a
//! local folder, or S3 (`s3://BUCKET/PREFIX`, with `endpointurl` for S3-compatible servers,
//! path-style requests, credentials from the config or the usual `AWS_*` variables). A
//! remote has the cache's layout: `PREFIX/files/md5/XX/REST`.
//!
//! [`push`] uploads every version's files and then its manifest (so a remote never holds a
//! manifest whose files are missing); [`pull`] fetches what the `.dvc` files and version
//! logs name, checks each object's MD5 before it enters the cache, then checks out. An
//! unreachable remote is an error before anything local changes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};

use super::project::object_relpath;
use super::{manifest, Dataset, DatasetError, Project, Remote};

/// How many objects move at once.
const PARALLEL: usize = 8;

/// An opened remote.
pub struct RemoteStore {
    remote: Remote,
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

impl RemoteStore {
    /// Opens `remote` of `project` (a relative folder is relative to `.dvc/`, as DVC reads it).
    ///
    /// # Errors
    /// An unsupported URL scheme, or a local folder that cannot be made.
    pub fn open(project: &Project, remote: &Remote) -> Result<Self, DatasetError> {
        let fail = |message: String| DatasetError::Remote { name: remote.name.clone(), url: remote.url.clone(), message };
        let url = remote.url.trim();
        let (store, prefix): (Arc<dyn ObjectStore>, String) = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(fail("an S3 url needs a bucket: s3://BUCKET/PREFIX".into()));
            }
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_virtual_hosted_style_request(false)
                .with_retry(RetryConfig { max_retries: 2, retry_timeout: Duration::from_secs(20), backoff: BackoffConfig::default() })
                .with_client_options(ClientOptions::new().with_allow_http(true).with_connect_timeout(Duration::from_secs(5)).with_timeout(Duration::from_secs(300)));
            if let Some(e) = &remote.endpointurl {
                b = b.with_endpoint(e);
            }
            if let Some(r) = &remote.region {
                b = b.with_region(r);
            } else if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
                b = b.with_region("us-east-1");
            }
            if let Some(k) = &remote.access_key_id {
                b = b.with_access_key_id(k);
            }
            if let Some(s) = &remote.secret_access_key {
                b = b.with_secret_access_key(s);
            }
            (Arc::new(b.build().map_err(|e| fail(e.to_string()))?), prefix.trim_matches('/').to_string())
        } else if url.contains("://") && !url.starts_with("file://") {
            return Err(fail("Atelier reaches folder and s3:// remotes; use dvc itself for other kinds".into()));
        } else {
            let path = std::path::Path::new(url.strip_prefix("file://").unwrap_or(url));
            let path = if path.is_absolute() { path.to_path_buf() } else { project.root().join(".dvc").join(path) };
            std::fs::create_dir_all(&path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
            (Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&path).map_err(|e| fail(e.to_string()))?), String::new())
        };
        Ok(Self { remote: remote.clone(), store, prefix })
    }

    fn path(&self, hash: &str) -> ObjectPath {
        let rel = object_relpath(hash);
        ObjectPath::from(if self.prefix.is_empty() { rel } else { format!("{}/{rel}", self.prefix) })
    }

    fn fail(&self, message: String) -> DatasetError {
        DatasetError::Remote { name: self.remote.name.clone(), url: self.remote.url.clone(), message }
    }

    /// Whether the remote holds `hash`.
    async fn has(&self, hash: &str) -> Result<bool, DatasetError> {
        match self.store.head(&self.path(hash)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.fail(format!("unreachable or refused: {e}"))),
        }
    }

    async fn put(&self, hash: &str, bytes: Vec<u8>) -> Result<(), DatasetError> {
        self.store.put(&self.path(hash), PutPayload::from(bytes)).await.map(|_| ()).map_err(|e| self.fail(format!("uploading {hash}: {e}")))
    }

    /// The object `hash`, or `None` when the remote lacks it.
    async fn get(&self, hash: &str) -> Result<Option<Vec<u8>>, DatasetError> {
        match self.store.get(&self.path(hash)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| self.fail(format!("downloading {hash}: {e}")))?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.fail(format!("unreachable or refused: {e}"))),
        }
    }
}

/// What a push or pull moved.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Transfer {
    /// Objects sent or fetched.
    pub moved: usize,
    /// Objects already on the other side.
    pub present: usize,
    /// Objects neither side has (named by the versions that need them).
    pub missing: Vec<String>,
}

/// Every version's manifest hash of `datasets`, current ones first.
fn wanted_versions(project: &Project, datasets: &[Dataset]) -> Result<Vec<(String, String)>, DatasetError> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for ds in datasets {
        let current = project.version(ds, None).ok().map(|v| v.md5);
        let mut versions: Vec<String> = current.into_iter().collect();
        versions.extend(project.versions(ds)?.into_iter().rev().map(|v| v.md5));
        for md5 in versions {
            if md5.ends_with(".dir") && seen.insert(md5.clone()) {
                out.push((ds.id.clone(), md5));
            }
        }
    }
    Ok(out)
}

/// Uploads every version of `datasets` that the remote lacks: files first, then manifests.
/// `progress(done, total)` counts objects.
///
/// # Errors
/// The remote is unreachable or refuses a write.
pub async fn push(project: &Project, datasets: &[Dataset], remote: &RemoteStore, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Transfer, DatasetError> {
    let mut report = Transfer::default();
    let mut files = BTreeSet::new();
    let mut manifests = Vec::new();
    for (id, md5) in wanted_versions(project, datasets)? {
        match project.read_manifest(&md5) {
            Ok(entries) => {
                let mut whole = true;
                for e in entries {
                    if project.object_path(&e.md5).is_file() {
                        files.insert(e.md5);
                    } else {
                        whole = false;
                        report.missing.push(format!("{id}: {} ({md5})", e.relpath));
                    }
                }
                if whole {
                    manifests.push(md5);
                }
            }
            Err(reason) => report.missing.push(format!("{id}: {reason}")),
        }
    }
    let total = (files.len() + manifests.len()) as u64;
    let done = std::sync::atomic::AtomicU64::new(0);
    let tick = || progress(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1, total);
    let send = |hash: String| {
        let tick = &tick;
        async move {
            let sent = if remote.has(&hash).await? {
                false
            } else {
                let path = project.object_path(&hash);
                let bytes = tokio::fs::read(&path).await.map_err(|source| DatasetError::Io { path, source })?;
                remote.put(&hash, bytes).await?;
                true
            };
            tick();
            Ok::<bool, DatasetError>(sent)
        }
    };
    for group in [files.into_iter().collect::<Vec<_>>(), manifests] {
        let sent: Vec<bool> = stream::iter(group.into_iter().map(send)).buffer_unordered(PARALLEL).try_collect().await?;
        report.moved += sent.iter().filter(|s| **s).count();
        report.present += sent.iter().filter(|s| !**s).count();
    }
    Ok(report)
}

/// Fetches into the cache what `datasets` need (their `.dvc` versions, and the versions of
/// their logs the remote has), each object checked against its MD5, then checks each
/// dataset out at its `.dvc` version.
///
/// # Errors
/// The remote is unreachable, or lacks a `.dvc` file's current version (then nothing in
/// the workspace changes).
pub async fn pull(project: &Project, datasets: &[Dataset], remote: &RemoteStore, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Transfer, DatasetError> {
    let mut report = Transfer::default();
    let currents: BTreeSet<String> = datasets.iter().filter_map(|ds| project.version(ds, None).ok().map(|v| v.md5)).collect();
    let mut needed = BTreeSet::new();
    for (id, md5) in wanted_versions(project, datasets)? {
        let entries = match project.read_manifest(&md5) {
            Ok(e) => {
                report.present += 1;
                e
            }
            Err(_) => match remote.get(&md5).await? {
                Some(bytes) if manifest::md5_bytes(&bytes) == md5.trim_end_matches(".dir") => {
                    let entries = manifest::parse_manifest(&bytes).map_err(|m| remote.fail(m))?;
                    project.store_bytes(&md5, &bytes)?;
                    report.moved += 1;
                    entries
                }
                Some(_) => return Err(remote.fail(format!("its copy of {md5} does not match its hash"))),
                None if currents.contains(&md5) => return Err(remote.fail(format!("it does not hold {md5}, the current version of {id}; push it first"))),
                None => {
                    report.missing.push(format!("{id}: {md5}"));
                    continue;
                }
            },
        };
        for e in entries {
            if project.object_path(&e.md5).is_file() {
                report.present += 1;
            } else {
                needed.insert((e.md5, currents.contains(&md5), format!("{id}: {}", e.relpath)));
            }
        }
    }
    let total = needed.len() as u64;
    let done = std::sync::atomic::AtomicU64::new(0);
    let fetch = |(hash, current, what): (String, bool, String)| {
        let done = &done;
        async move {
            let got = remote.get(&hash).await?;
            progress(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1, total);
            match got {
                Some(bytes) if manifest::md5_bytes(&bytes) == hash => {
                    project.store_bytes(&hash, &bytes)?;
                    Ok(None)
                }
                Some(_) => Err(remote.fail(format!("its copy of {what} ({hash}) does not match its hash"))),
                None if current => Err(remote.fail(format!("it does not hold {what} ({hash}); push it first"))),
                None => Ok(Some(format!("{what} ({hash})"))),
            }
        }
    };
    let results: Vec<Option<String>> = stream::iter(needed.into_iter().map(fetch)).buffer_unordered(PARALLEL).try_collect().await?;
    for r in results {
        match r {
            Some(m) => report.missing.push(m),
            None => report.moved += 1,
        }
    }
    for ds in datasets {
        project.checkout(ds, None, &mut |_| {})?;
    }
    Ok(report)
}
