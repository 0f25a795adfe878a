"""The bottom layer: errors, YAML and JSON files, validation with located messages, the
registry mechanism, and where the repository's shipped files are. Imports nothing of the project
above it."""
