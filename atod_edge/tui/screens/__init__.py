"""One module per screen: live, inspector, dashboard, and the help / open / text dialogs."""
