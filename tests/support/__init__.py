"""Test support: a hermetic real podman (`podman`), fixture trees and images
(`fixture_trees`) and the canonical filesystem listing used to compare results
(`listing`). Tests import these as ``from support.listing import ...``."""
