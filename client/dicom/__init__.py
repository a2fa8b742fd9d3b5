"""DICOM ingestion: image series, PET SUV factor, RTSTRUCT and DICOM SEG masks.

Every function in this package is pure (no printing, no file writing). Any problem with one
case's files is raised as a :class:`~common.errors.CaseError` whose detail names the file (or
folder) and the reason, so that the site skips that case and goes on.

Axis conventions (SimpleITK): an index or continuous index is ``(x, y, z)`` = (column, row,
slice), while :func:`SimpleITK.GetArrayFromImage` gives arrays ordered ``(z, y, x)``.

Modules
-------
files
    Telling a DICOM file by its preamble and reading its Modality; what the readers share.
series
    Listing a folder's image series and reading one as a 3D volume (every slice checked).
suv
    The factor turning PET activity concentration (Bq/mL) into SUV body weight.
masks
    An RTSTRUCT ROI or a DICOM SEG segment placed on a reference image's grid.
"""
