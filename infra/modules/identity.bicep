// User-assigned managed identity of the Function App. One identity for the host storage, the
// deployment container, the data storage (connection STORAGE) and Application Insights, so that
// every role assignment names the same principal and survives a re-creation of the app.

@description('Azure region.')
param location string

@description('Name of the user-assigned identity.')
param name string

@description('Tags for every resource.')
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
