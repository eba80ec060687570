"""The packaged YAML configs: `tune run simko_recipe --config NAME` resolves NAME here."""
