"""etl-config.toml: loading it, the settings it describes, and keeping its secrets out of output."""
