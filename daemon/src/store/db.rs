//! PostgreSQL: connection, migrations (`migrations/*.sql`, embedded in the binary) and the URL rules.

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

/// The schema, embedded at build time from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Where rlaifd's database is when nothing says otherwise.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/rlaifd";

/// `DATABASE_URL`, or the default.
pub fn url_from_env() -> String {
    std::env::var("DATABASE_URL").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| DEFAULT_URL.to_string())
}

/// The URL without its password, for messages and logs.
pub fn redacted(url: &str) -> String {
    match PgConnectOptions::from_str(url) {
        Ok(o) if o.get_socket().is_some() => format!(
            "postgres://{}@/{} (socket in {})",
            o.get_username(),
            o.get_database().unwrap_or(""),
            o.get_socket().map(|p| p.display().to_string()).unwrap_or_default()
        ),
        Ok(o) => format!(
            "postgres://{}@{}:{}/{}",
            o.get_username(),
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("")
        ),
        Err(_) => "<unparsable database URL>".into(),
    }
}

/// A pool on `url`. Errors say which server was tried and how to point rlaifd elsewhere.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let opts = PgConnectOptions::from_str(url)
        .with_context(|| format!("invalid database URL {} (expected postgres://user@host:port/db)", redacted(url)))?;
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .with_context(|| {
            format!(
                "cannot connect to PostgreSQL at {} (set DATABASE_URL, or --database-url, to a reachable server)",
                redacted(url)
            )
        })
}

/// Creates database `name` on the server of `server` (any database of it) if it does not exist.
pub async fn create_database(server: &PgConnectOptions, name: &str) -> Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        anyhow::bail!("database name {name:?} must be non-empty ASCII letters, digits and underscores");
    }
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(server.clone().database("postgres"))
        .await
        .with_context(|| {
            format!("cannot connect to the postgres database of {}:{}", server.get_host(), server.get_port())
        })?;
    let exists: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1").bind(name).fetch_optional(&admin).await?;
    if exists.is_none() {
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
    }
    admin.close().await;
    Ok(())
}

/// Applies every migration not yet applied (idempotent; concurrent callers serialise on sqlx's advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await.context("applying database migrations")?;
    Ok(())
}

/// Connects to `url`, creating its database first when the server is reachable but the database is missing,
/// then migrates.
pub async fn open(url: &str, max_connections: u32) -> Result<PgPool> {
    let pool = match connect(url, max_connections).await {
        Ok(p) => p,
        Err(e) => {
            let opts = PgConnectOptions::from_str(url)?;
            let Some(db) = opts.get_database().map(str::to_string) else { return Err(e) };
            if !is_missing_database(&e) || create_database(&opts, &db).await.is_err() {
                return Err(e);
            }
            connect(url, max_connections).await?
        }
    };
    migrate(&pool).await?;
    Ok(pool)
}

fn is_missing_database(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<sqlx::Error>()
            .and_then(|s| s.as_database_error())
            .and_then(|d| d.code())
            .is_some_and(|code| code == "3D000")
    })
}
