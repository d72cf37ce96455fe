-- As a hospital PACS would be set up: when a study is stable, forward its CT series
-- to oncopacs. Only CT, so the SEG/SR/card stored back are not sent round again;
-- re-sent CT instances are known to oncopacs and open no new job.
-- (Orthanc 1.10's Lua SendToModality takes instance ids only, hence the REST call.)
function OnStableStudy(studyId, tags, metadata)
  local ct = {}
  for _, seriesId in ipairs(ParseJson(RestApiGet('/studies/' .. studyId))['Series']) do
    local series = ParseJson(RestApiGet('/series/' .. seriesId))
    if series['MainDicomTags']['Modality'] == 'CT' then
      table.insert(ct, seriesId)
    end
  end
  if #ct > 0 then
    RestApiPost('/modalities/oncopacs/store',
                DumpJson({Resources = ct, Synchronous = false}))
  end
end
