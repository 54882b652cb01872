"""Constants of the bundle format, shared by the exporter that writes bundles and the
runtime that reads them (one definition, so the two cannot drift apart)."""

FORMAT_VERSION = 1  # bump when a manifest field changes meaning or a runtime must refuse old bundles
MANIFEST = "manifest.json"
