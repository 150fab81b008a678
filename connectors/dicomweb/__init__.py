"""DICOMweb STOW-RS intake: multipart DICOM instances → blob store + `imaging.instances`."""
