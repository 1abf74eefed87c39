//! A real S3-protocol server (s3s + s3s-fs, SigV4) over a folder, for the
//! object-storage benchmark (`benches/e2e.sh`): buckets are sub-folders,
//! objects are files. The same server the tests start in-process.
//!
//!     cargo run --release --example s3_server -- ROOT ACCESS_KEY SECRET_KEY
//!
//! Prints `listening on http://127.0.0.1:PORT` and serves until killed.

use std::io::Write;

use hyper_util::rt::TokioIo;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [root, access, secret] = args.as_slice() else {
        return Err("usage: s3_server ROOT ACCESS_KEY SECRET_KEY".into());
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
        println!("listening on http://{}", listener.local_addr()?);
        std::io::stdout().flush()?;
        loop {
            let (socket, _) = listener.accept().await?;
            let service = service.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    })
}
