//! `veil-controller`: see `veil-controller --help`.

use veil_controller::ControllerServer;
use veil_controller::config::Config;

#[tokio::main]
async fn main() {
    let config: Config = veil_ops::parse_flags();
    if let Err(e) = veil_ops::logging::init(config.log_format, &config.log_filter) {
        veil_ops::config_error(&e);
    }
    let settings = match config.settings() {
        Ok(s) => s,
        Err(e) => veil_ops::config_error(&e),
    };
    if config.check_config {
        settings.effective(&config).print_and_exit();
    }
    let result = if config.dev {
        dev(&config).await
    } else {
        async {
            ControllerServer::load(settings)
                .await?
                .run(veil_ops::signal::shutdown())
                .await
        }
        .await
    };
    if let Err(e) = result {
        tracing::error!(error = %format!("{e:#}"), "controller failed");
        std::process::exit(1);
    }
}

/// `--dev`: a whole local cluster in this process.
#[cfg(feature = "dev")]
async fn dev(config: &Config) -> anyhow::Result<()> {
    use veil_controller::dev;
    dev::serve(
        dev::Options {
            relays: config.dev_relays,
            controllers: config.dev_controllers,
            ..dev::Options::default()
        },
        veil_ops::signal::shutdown(),
    )
    .await
}

/// `--dev` needs the relay, which a build without the `dev` feature leaves out.
#[cfg(not(feature = "dev"))]
async fn dev(_: &Config) -> anyhow::Result<()> {
    veil_ops::config_error(&anyhow::anyhow!(
        "--dev: this veil-controller was built without the `dev` feature (it links no relay)"
    ))
}
