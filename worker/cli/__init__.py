"""The `loadwarden` command line and how it renders reports."""
