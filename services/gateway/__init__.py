"""The gateway: the public EditService (auth, validation, template records, edits through the scheduler)."""
