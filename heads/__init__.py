"""heads: SAOA / SAP / baseline heads trained on a feature store."""
