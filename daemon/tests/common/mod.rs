//! Test databases: a fresh PostgreSQL database per test on the server of $RLAIFD_TEST_DATABASE_URL (default
//! postgres://postgres@127.0.0.1:5432/postgres), migrated, dropped when the guard goes.
#![allow(dead_code)]

use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

pub fn server() -> PgConnectOptions {
    let url = std::env::var("RLAIFD_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
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
    let admin = sqlx::PgPool::connect_with(server().database("postgres")).await.expect("PostgreSQL must run for these tests (see README: Test)");
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
