//! A real S3-protocol server (`s3s` with the `s3s-fs` file-system backend,
//! SigV4 authentication) started in the test process on 127.0.0.1, over a
//! temporary directory: buckets are folders, objects are files.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use hyper_util::rt::TokioIo;

pub const ACCESS_KEY: &str = "AKIACRMIMPORTTEST";
pub const SECRET_KEY: &str = "s3-secret-never-printed-9f8e7d6c";

pub struct S3 {
    runtime: tokio::runtime::Runtime,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl S3 {
    pub fn start() -> S3 {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fs = s3s_fs::FileSystem::new(dir.path()).unwrap();
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        S3 { runtime, addr, dir }
    }

    /// Creates a bucket (a folder).
    pub fn bucket(&self, bucket: &str) {
        std::fs::create_dir_all(self.dir.path().join(bucket)).unwrap();
    }

    /// Puts an object (a file under the bucket's folder).
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let path: PathBuf = self.dir.path().join(bucket).join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// The standard S3 environment pointing at this server.
    pub fn env(&self, command: &mut Command) {
        self.env_with_secret(command, SECRET_KEY);
    }

    pub fn env_with_secret(&self, command: &mut Command, secret: &str) {
        command
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", format!("http://{}", self.addr))
            .env("AWS_ALLOW_HTTP", "true");
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _guard = self.runtime.enter();
    }
}
