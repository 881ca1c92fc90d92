"""Organisations and their collections (groups, ad-hoc groups, projects), memberships, roles and invitations."""
