//! A clustered VM datastore on one LUN.
