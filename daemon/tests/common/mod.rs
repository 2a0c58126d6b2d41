//! Test databases: a fresh PostgreSQL database per test on the server of $RLAIFD_TEST_DATABASE_URL (default
//! postgres://postgres@127.0.0.1:5432/postgres), migrated, dropped when the guard goes.
#![allow(dead_code)]

pub mod daemon;
pub mod pg;

use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

pub fn server() -> PgConnectOptions {
    let url = std::env::var("RLAIFD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    PgConnectOptions::from_str(&url).expect("RLAIFD_TEST_DATABASE_URL is not a postgres URL")
}

pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

static N: AtomicUsize = AtomicUsize::new(0);

/// A new, migrated database named after the test.
pub async fn fresh(tag: &str) -> TestDb {
    let name = format!("rlaifd_t_{tag}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let admin = sqlx::PgPool::connect_with(server().database("postgres"))
        .await
        .expect("PostgreSQL must run for these tests (see README: Test)");
    // Databases left by test processes that died (a failed assertion skips the drop) are removed here.
    let stale: Vec<String> =
        sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE 'rlaifd\\_t\\_%'")
            .fetch_all(&admin)
            .await
            .unwrap();
    for db in stale {
        let pid = db.rsplit('_').nth(1).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| p != std::process::id() && !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)")).execute(&admin).await;
        }
    }
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&admin).await.unwrap();
    admin.close().await;
    let opts = server().database(&name);
    let url = format!("postgres://{}@{}:{}/{name}", opts.get_username(), opts.get_host(), opts.get_port());
    let pool = rlaifd::db::open(&url, 8).await.expect("migrating the test database");
    TestDb { name, url, pool }
}

impl TestDb {
    pub async fn drop_db(self) {
        self.pool.close().await;
        let admin = sqlx::PgPool::connect_with(server().database("postgres")).await.unwrap();
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name)).execute(&admin).await.unwrap();
        admin.close().await;
    }
}
