//! `veil-relay`: see `veil-relay --help`.

use veil_relay::RelayServer;
use veil_relay::config::Config;

#[tokio::main]
async fn main() {
    let mut config: Config = veil_ops::parse_flags();
    if let Err(e) = veil_ops::logging::init(config.log_format, &config.log_filter) {
        veil_ops::config_error(&e);
    }
    // Before validation: it fills the public addresses a wildcard bind requires.
    if let Err(e) = config.apply_public_ip_file() {
        veil_ops::config_error(&e);
    }
    let settings = match config.settings() {
        Ok(s) => s,
        Err(e) => veil_ops::config_error(&e),
    };
    if config.check_config {
        settings.effective(&config).print_and_exit();
    }
    let result = async {
        RelayServer::load(settings)
            .await?
            .run(veil_ops::signal::shutdown())
            .await
    }
    .await;
    if let Err(e) = result {
        tracing::error!(error = %format!("{e:#}"), "relay failed");
        std::process::exit(1);
    }
}
