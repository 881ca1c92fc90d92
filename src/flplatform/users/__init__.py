"""Users: accounts, login names, API tokens, self-registration."""
