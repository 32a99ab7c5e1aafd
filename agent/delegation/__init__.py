"""Where a model runs: delegate interface, policies (auto/prefer), selection, serving, failover."""
