"""Device profiles as data files (one JSON file per device); shipped as package data."""
