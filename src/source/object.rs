//! Inputs where exports live: `s3://bucket/key`, `s3://bucket/prefix/`,
//! `gs://…`, `az://…` and `https://…`, through Apache Arrow's `object_store`.
//!
//! - Credentials and endpoints come only from each cloud's standard
//!   environment (`AmazonS3Builder::from_env` and its GCS/Azure twins:
//!   `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//!   `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`…), never the config.
//! - A prefix (a URL ending in `/`) is read like a directory: its data files
//!   only, in key order (`_SUCCESS`, `README.txt` and the like are skipped).
//! - Nothing is downloaded whole first: a CSV object is one streamed GET that
//!   the reader thread pulls chunk by chunk (`SyncIoBridge` over the body
//!   stream, so memory holds one network chunk at a time); a Parquet object is
//!   read by ranges through `ParquetObjectReader` (footer, then only the
//!   projected column chunks).
//! - Every failure is one sentence naming the URL: no such bucket or key,
//!   access denied, an unreachable endpoint (after a few bounded retries), an
//!   empty prefix.

use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientConfigKey, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig,
};
use tokio::runtime::Handle;

use super::{FileKind, InputFile, SourceError, data_file_kind, kind_of};

/// An object to read: its store, key and size, and the runtime that drives its I/O.
#[derive(Clone)]
pub struct ObjectInput {
    pub store: Arc<dyn ObjectStore>,
    pub path: ObjectPath,
    pub size: u64,
    pub handle: Handle,
}

impl std::fmt::Debug for ObjectInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectInput({}, {} bytes)", self.path, self.size)
    }
}

/// Whether an INPUT is a URL read through object storage.
pub fn is_url(input: &str) -> bool {
    [
        "s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://", "https://", "http://",
    ]
    .iter()
    .any(|scheme| input.starts_with(scheme))
}

/// Expands a URL INPUT into the objects it names (one, or a prefix's data files).
pub fn expand(input: &str, handle: &Handle) -> Result<Vec<InputFile>, SourceError> {
    let err = |message: String| SourceError::Object {
        url: input.to_owned(),
        message,
    };
    let url = url::Url::parse(input).map_err(|e| err(format!("not a valid URL ({e})")))?;
    let (store, path) = store_for(&url).map_err(|e| err(describe(&e)))?;
    let store: Arc<dyn ObjectStore> = Arc::from(store);
    if input.ends_with('/') {
        return expand_prefix(input, &url, store, path, handle);
    }
    let kind = kind_of(path.as_ref()).ok_or_else(|| SourceError::UnsupportedType {
        path: input.to_owned(),
    })?;
    let meta = handle
        .block_on(store.head(&path))
        .map_err(|e| err(describe(&e)))?;
    Ok(vec![InputFile {
        name: input.to_owned(),
        path: None,
        object: Some(ObjectInput {
            store,
            path,
            size: meta.size,
            handle: handle.clone(),
        }),
        kind,
    }])
}

/// Every data file under a prefix, in key order, named by its full URL.
fn expand_prefix(
    input: &str,
    url: &url::Url,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    handle: &Handle,
) -> Result<Vec<InputFile>, SourceError> {
    let err = |message: String| SourceError::Object {
        url: input.to_owned(),
        message,
    };
    let prefix = (!prefix.as_ref().is_empty()).then_some(prefix);
    let mut objects = handle
        .block_on(store.list(prefix.as_ref()).try_collect::<Vec<_>>())
        .map_err(|e| err(describe(&e)))?;
    objects.sort_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()));
    let base = format!("{}://{}", url.scheme(), url.authority());
    let files: Vec<InputFile> = objects
        .into_iter()
        .filter_map(|meta| {
            let key = meta.location.as_ref();
            let file_name = key.rsplit('/').next().unwrap_or(key);
            let kind: FileKind = data_file_kind(file_name)?;
            Some(InputFile {
                name: format!("{base}/{key}"),
                path: None,
                object: Some(ObjectInput {
                    store: store.clone(),
                    path: meta.location.clone(),
                    size: meta.size,
                    handle: handle.clone(),
                }),
                kind,
            })
        })
        .collect();
    if files.is_empty() {
        return Err(err(
            "no .csv, .csv.gz, .tsv, .tsv.gz or .parquet objects under this prefix".into(),
        ));
    }
    Ok(files)
}

/// The store and key of a URL, configured from the environment only.
fn store_for(url: &url::Url) -> object_store::Result<(Box<dyn ObjectStore>, ObjectPath)> {
    // Bounded: an unreachable endpoint fails in seconds, not minutes; a large
    // object may take long to stream, so the request itself has a generous bound.
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(15),
    };
    let path = ObjectPath::from_url_path(url.path())?;
    // Timeouts go through `with_config`, which keeps what `from_env` read
    // (`with_client_options` would replace it, `AWS_ALLOW_HTTP` included).
    let (connect, request) = ("10s", "6h");
    let store: Box<dyn ObjectStore> = match url.scheme() {
        "s3" | "s3a" => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey as Key};
            Box::new(
                AmazonS3Builder::from_env()
                    .with_url(url.as_str())
                    .with_config(Key::Client(ClientConfigKey::ConnectTimeout), connect)
                    .with_config(Key::Client(ClientConfigKey::Timeout), request)
                    .with_retry(retry)
                    .build()?,
            )
        }
        "gs" => {
            use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey as Key};
            Box::new(
                GoogleCloudStorageBuilder::from_env()
                    .with_url(url.as_str())
                    .with_config(Key::Client(ClientConfigKey::ConnectTimeout), connect)
                    .with_config(Key::Client(ClientConfigKey::Timeout), request)
                    .with_retry(retry)
                    .build()?,
            )
        }
        "az" | "abfs" | "abfss" => {
            use object_store::azure::{AzureConfigKey as Key, MicrosoftAzureBuilder};
            Box::new(
                MicrosoftAzureBuilder::from_env()
                    .with_url(url.as_str())
                    .with_config(Key::Client(ClientConfigKey::ConnectTimeout), connect)
                    .with_config(Key::Client(ClientConfigKey::Timeout), request)
                    .with_retry(retry)
                    .build()?,
            )
        }
        _ => {
            let client = ClientOptions::new()
                .with_connect_timeout(std::time::Duration::from_secs(10))
                .with_timeout(std::time::Duration::from_secs(6 * 3600))
                .with_allow_http(url.scheme() == "http");
            Box::new(
                object_store::http::HttpBuilder::new()
                    .with_url(format!("{}://{}", url.scheme(), url.authority()))
                    .with_client_options(client)
                    .with_retry(retry)
                    .build()?,
            )
        }
    };
    Ok((store, path))
}

/// One clause for an object-store error (the URL is named by the caller).
pub fn describe(e: &object_store::Error) -> String {
    use object_store::Error;
    match e {
        Error::NotFound { .. } => "no such bucket or key".into(),
        Error::PermissionDenied { .. } | Error::Unauthenticated { .. } => {
            "access denied: check the cloud credentials in the environment (e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)".into()
        }
        other => {
            let mut text = root_cause(other);
            if text.len() > 300 {
                text.truncate(text.char_indices().nth(300).map_or(text.len(), |(i, _)| i));
            }
            format!("cannot read it: {text}")
        }
    }
}

/// The error chain in one line (object_store's own text, then its causes).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut current = e.source();
    while let Some(next) = current {
        let text = next.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = next.source();
    }
    parts.join(": ").replace(['\n', '\r'], " ")
}

/// Network chunks a CSV object's GET reads ahead of the parser (hyper's chunks
/// are 8–64 KiB, so this bounds the read-ahead to a few MiB).
const READ_AHEAD_CHUNKS: usize = 64;

/// A streamed GET of a whole object, as a blocking reader for the reader
/// thread. A task on the runtime pulls the body into a bounded channel, so the
/// network keeps going while the reader parses, and memory stays bounded.
pub fn open_stream(object: &ObjectInput) -> object_store::Result<Box<dyn std::io::Read + Send>> {
    let get = object.handle.block_on(object.store.get(&object.path))?;
    let mut body = get.into_stream();
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(READ_AHEAD_CHUNKS);
    object.handle.spawn(async move {
        use futures_util::StreamExt;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(std::io::Error::other);
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let reader = tokio_util::io::StreamReader::new(Box::pin(chunks));
    Ok(Box::new(tokio_util::io::SyncIoBridge::new_with_handle(
        reader,
        object.handle.clone(),
    )))
}
