"""The Kinetica backend: storage over the REST API, changes through table monitors."""
