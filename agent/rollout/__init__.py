"""The device side of model rollouts: releases, model store, download, preflight, swap."""
