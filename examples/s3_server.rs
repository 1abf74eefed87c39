//! A real S3-protocol server (s3s + s3s-fs, SigV4) over a folder, for the
//! object-storage benchmark (`benches/e2e.sh`): buckets are sub-folders.
//! The same server the tests start in-process.
//!
//!     cargo run --release --example s3_server -- ROOT ACCESS_KEY SECRET_KEY [BUCKET/KEY=FILE]...
//!
//! Each `BUCKET/KEY=FILE` is uploaded through the S3 API (a PUT), so the
//! server stores the object's ETag once instead of hashing the whole file on
//! every GET, as s3s-fs does for files placed on disk by hand; then it prints
//! `listening on http://127.0.0.1:PORT` and serves until killed.

use std::io::Write;

use hyper_util::rt::TokioIo;
use object_store::ObjectStoreExt;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [root, access, secret, uploads @ ..] = args.as_slice() else {
        return Err("usage: s3_server ROOT ACCESS_KEY SECRET_KEY [BUCKET/KEY=FILE]...".into());
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let fs = s3s_fs::FileSystem::new(root).map_err(|e| format!("{root}: {e:?}"))?;
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(
            access.as_str(),
            secret.as_str(),
        ));
        let service = builder.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        for upload in uploads {
            let (target, file) = upload.split_once('=').ok_or("BUCKET/KEY=FILE")?;
            let (bucket, key) = target.split_once('/').ok_or("BUCKET/KEY=FILE")?;
            std::fs::create_dir_all(std::path::Path::new(root).join(bucket))?;
            let store = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_access_key_id(access.as_str())
                .with_secret_access_key(secret.as_str())
                .with_region("us-east-1")
                .with_endpoint(format!("http://{addr}"))
                .with_allow_http(true)
                .build()?;
            let bytes = std::fs::read(file)?;
            store.put(&key.into(), bytes.into()).await?;
        }
        println!("listening on http://{addr}");
        std::io::stdout().flush()?;
        std::future::pending::<()>().await;
        Ok(())
    })
}
