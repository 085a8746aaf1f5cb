//! A fresh MariaDB database per test (127.0.0.1:3306, root, no password), dropped at the
//! end.

pub const MARIADB: &str = "mysql://root@127.0.0.1:3306";

pub struct ScratchDb {
    pub name: String,
    admin: sqlx::MySqlPool,
}

impl ScratchDb {
    /// Creates `xz_<tag>_<random>`.
    pub async fn new(tag: &str) -> ScratchDb {
        let admin = sqlx::MySqlPool::connect(&format!("{MARIADB}/test"))
            .await
            .expect("MariaDB at 127.0.0.1:3306 (root, no password); .ci/run starts it");
        let name = format!(
            "xz_{tag}_{}",
            xiaozhi_gateway::history::record::new_id()[..12].to_owned()
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE `{name}` CHARACTER SET utf8mb4"
        )))
        .execute(&admin)
        .await
        .unwrap();
        ScratchDb { name, admin }
    }

    pub fn url(&self) -> String {
        format!("{MARIADB}/{}", self.name)
    }

    pub async fn pool(&self) -> sqlx::MySqlPool {
        sqlx::MySqlPool::connect(&self.url()).await.unwrap()
    }

    pub async fn drop_db(self) {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE `{}`",
            self.name
        )))
        .execute(&self.admin)
        .await;
    }
}
